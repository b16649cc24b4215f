"""Optimizer classes: SAM (with ASAM, SSAM, USAM and the step schedules as options), ESAM, LookSAM and
MomentumSAM, over the fused op layer."""

from .bn import freeze_bn_stats
from .cheap import LookSAM, MomentumSAM
from .esam import ESAM, sample_losses_closure, selected_count
from .rho_schedulers import LambdaRho, MultiplicativeRho, ProportionalRho, RhoScheduler
from .sam import SAM
from .schedules import AESAM, Interval, LatePhase, Randomized, Schedule

__all__ = ["AESAM", "ESAM", "SAM", "Interval", "LambdaRho", "LatePhase", "LookSAM", "MomentumSAM",
           "MultiplicativeRho", "ProportionalRho", "Randomized", "RhoScheduler", "Schedule",
           "freeze_bn_stats", "sample_losses_closure", "selected_count"]
