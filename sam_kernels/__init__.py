"""sam_kernels: fused multi-tensor kernels for sharpness-aware minimization and its variants."""

from . import clip, distributed, ops, optim
from .backends import report as backend_report
from .clip import clip_grad_norm_
from .integrations import unwrap
from .optim import (
    ESAM,
    GCSAM,
    GSAM,
    SAM,
    WSAM,
    BayesianSAM,
    FisherSAM,
    FriendlySAM,
    LookSAM,
    MomentumSAM,
    MultiStepSAM,
    SparseSAM,
    VaSSO,
    freeze_bn_stats,
    sample_losses_closure,
)

__all__ = [
    "ESAM",
    "GCSAM",
    "GSAM",
    "SAM",
    "WSAM",
    "BayesianSAM",
    "FisherSAM",
    "FriendlySAM",
    "LookSAM",
    "MomentumSAM",
    "MultiStepSAM",
    "SparseSAM",
    "VaSSO",
    "backend_report",
    "clip",
    "clip_grad_norm_",
    "distributed",
    "freeze_bn_stats",
    "ops",
    "optim",
    "sample_losses_closure",
    "unwrap",
]
# The package version, and the only place it is written: the build reads this line as text
# (pyproject.toml, [tool.setuptools.dynamic]), so it stays a plain string literal.
__version__ = "0.1.0"
