"""Optimizer classes: SAM (with ASAM, SSAM, USAM and the step schedules as options), ESAM, LookSAM and
MomentumSAM, each a policy (``policy.Policy``) over one engine (``sam.SAM``), over the fused op layer;
schedulers of the radius."""

from .bn import freeze_bn_stats
from .bsam import BayesianSAM
from .esam import ESAM, ESAMPolicy, sample_losses_closure, selected_count
from .fisher_sam import FisherSAM, FisherSAMPolicy
from .friendly_sam import FriendlySAM, FriendlySAMPolicy
from .gcsam import GCSAM, GCSAMPolicy
from .gsam import GSAM, GSAMPolicy
from .looksam import LookSAM, LookSAMPolicy
from .momentum_sam import MomentumSAM, MomentumSAMPolicy
from .multi_step import MultiStepPolicy, MultiStepSAM
from .policy import Policy, StepContext
from .rho_schedulers import LambdaRho, MultiplicativeRho, ProportionalRho, RhoScheduler
from .sam import SAM
from .schedules import AESAM, Interval, LatePhase, Randomized, Schedule
from .sparse_sam import SparseSAM, SparseSAMPolicy
from .vasso import VaSSO, VaSSOPolicy
from .wsam import WSAM, WSAMPolicy

__all__ = [
           "AESAM",
           "ESAM",
           "GCSAM",
           "GSAM",
           "SAM",
           "WSAM",
           "BayesianSAM",
           "ESAMPolicy",
           "FisherSAM",
           "FisherSAMPolicy",
           "FriendlySAM",
           "FriendlySAMPolicy",
           "GCSAMPolicy",
           "GSAMPolicy",
           "Interval",
           "LambdaRho",
           "LatePhase",
           "LookSAM",
           "LookSAMPolicy",
           "MomentumSAM",
           "MomentumSAMPolicy",
           "MultiStepPolicy",
           "MultiStepSAM",
           "MultiplicativeRho",
           "Policy",
           "ProportionalRho",
           "Randomized",
           "RhoScheduler",
           "Schedule",
           "SparseSAM",
           "SparseSAMPolicy",
           "StepContext",
           "VaSSO",
           "VaSSOPolicy",
           "WSAMPolicy",
           "freeze_bn_stats",
           "sample_losses_closure",
           "selected_count",
]
