"""Deprecated module: LookSAM and MomentumSAM live in ``looksam.py`` and ``momentum_sam.py``; import them
from ``sam_kernels.optim``. Kept so that old imports keep working."""

import warnings

from .looksam import LookSAM
from .momentum_sam import MomentumSAM

warnings.warn("sam_kernels.optim.cheap is deprecated; import LookSAM and MomentumSAM from "
              "sam_kernels.optim", DeprecationWarning, stacklevel=2)

__all__ = ["LookSAM", "MomentumSAM"]
