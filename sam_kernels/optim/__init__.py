"""Optimizer classes: SAM (with ASAM, SSAM and USAM as options) and ESAM, over the fused op layer."""

from .bn import freeze_bn_stats
from .esam import ESAM, sample_losses_closure, selected_count
from .sam import SAM

__all__ = ["ESAM", "SAM", "freeze_bn_stats", "sample_losses_closure", "selected_count"]
