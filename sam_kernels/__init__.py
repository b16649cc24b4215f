"""sam_kernels: fused multi-tensor kernels for sharpness-aware minimization and its variants."""

from . import ops
from .backends import report as backend_report

__all__ = ["backend_report", "ops"]
__version__ = "0.1.0"
