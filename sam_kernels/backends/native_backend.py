"""The native backend: the compiled extension ``sam_kernels._C`` (csrc/), CPU and CUDA kernels.

The extension registers the ops ``torch.ops.sam_kernels.*`` (schemas in csrc/ops.cpp, CPU kernels in
csrc/cpu/, CUDA kernels in csrc/cuda/); this module calls them with the backend interface of
``reference.py`` and registers their fake implementations, which ``torch.compile`` and
``torch.library.opcheck`` use. One call per op covers every tensor of every dtype: the CPU kernels run
over (tensor, chunk) work items in parallel, the CUDA kernels launch once per dtype group (more only when a
group outgrows one launch's metadata table).

Importing this module never fails: without the extension ``status()`` says why, and calling an op raises a
``RuntimeError`` that says how to build it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence

import torch

from .common import AdamConfig, NoiseConfig, PerturbConfig, SgdConfig, split_u64

BUILD_HINT = ("build it from source: `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` "
              "(or the CMake build; see README, 'Backends and building from source')")

EXTENSION = "sam_kernels._C"

_C = None
_LOAD_ERROR: str | None = None
if importlib.util.find_spec(EXTENSION) is None:
    _LOAD_ERROR = f"the extension {EXTENSION} is not built"
else:
    try:
        _C = importlib.import_module(EXTENSION)  # loading the library registers torch.ops.sam_kernels.*
    except (ImportError, OSError, RuntimeError) as error:
        # An extension built against another torch fails here (undefined symbols), as does a second copy
        # of the library registering the same op namespace.
        _LOAD_ERROR = (f"{EXTENSION} is present but failed to load ({error}); rebuild it against the "
                       f"installed torch {torch.__version__}")


def is_built() -> bool:
    """Whether the extension is built and loaded."""
    return _C is not None


def build_info() -> dict:
    """What the extension was built with: ``built``, ``cuda``, ``cuda_archs``, ``cuda_version``, ..."""
    if _C is None:
        return {"built": False, "error": _LOAD_ERROR, "cuda": False, "cuda_archs": [], "cuda_version": ""}
    archs = [a for a in _C.CUDA_ARCHS.split(",") if a]
    return {"built": True, "error": None, "cuda": bool(_C.WITH_CUDA), "cuda_archs": archs,
            "cuda_version": _C.CUDA_VERSION, "build_tool": _C.BUILD_TOOL, "compiler": _C.CXX_COMPILER,
            "path": _C.__file__}


def describe() -> str:
    """One line on the extension for the backend report."""
    info = build_info()
    if not info["built"]:
        return str(info["error"])
    if info["cuda"]:
        cuda = f"CUDA {info['cuda_version']} for {', '.join(info['cuda_archs'])}"
    else:
        cuda = "no CUDA part"
    return f"built with {info['build_tool']} ({info['compiler']}): CPU; {cuda}"


def status(device_type: str) -> tuple[bool, str]:
    """Whether the native backend can run on this device type, and why (not)."""
    if _C is None:
        return False, f"{_LOAD_ERROR}; {BUILD_HINT}"
    if device_type == "cpu":
        return True, "sam_kernels._C is built (CPU kernels)"
    if device_type == "cuda":
        if _C.WITH_CUDA:
            return True, f"sam_kernels._C is built with CUDA kernels for {_C.CUDA_ARCHS}"
        return False, ("sam_kernels._C was built without its CUDA part (a CPU-only torch, no nvcc, or "
                       "SAM_KERNELS_NO_CUDA=1 at build time)")
    return False, f"the native backend has no kernels for device type {device_type!r}"


def _ops():
    if _C is None:
        raise RuntimeError(f"the native backend is unavailable: {_LOAD_ERROR}; {BUILD_HINT}")
    return torch.ops.sam_kernels


# ---------------------------------------------------------------------------- the backend interface


# NOTE (no conversions): the lists and numbers arrive as the schemas want them (lists of tensors and
# ints, Python floats and bools), so the calls below pass them through without a per-tensor Python pass.


def grad_norm(grads, weights, adaptive_eta):
    """Global norm and non-finite flag as 0-d fp32 device tensors (two-stage, deterministic)."""
    return _ops().grad_norm(grads, weights if weights is not None else (), adaptive_eta)


def perturb_(params, grads, backups, tensor_indices, norm, step, config: PerturbConfig) -> None:
    seed_lo, seed_hi = split_u64(config.seed)
    _ops().perturb_(params, grads, backups, tensor_indices, norm, step, config.rho, config.eps,
                    config.keep_threshold, config.scale_factor, config.normalize, config.adaptive,
                    config.adaptive_eta, seed_lo, seed_hi)


def restore_(params, backups) -> None:
    _ops().restore_(params, backups)


def gaussian_noise_(params, backups, scales, tensor_indices, step, config: NoiseConfig) -> None:
    seed_lo, seed_hi = split_u64(config.seed)
    _ops().gaussian_noise_(params, backups, scales, tensor_indices, step, config.values(), seed_lo, seed_hi)


def restore_sgd_step_(params, backups, grads, momentum_buffers, first_step, config: SgdConfig,
                      grad_multiplier, found_inf) -> None:
    buffers = momentum_buffers if config.momentum != 0 else ()
    _ops().restore_sgd_step_(params, backups, grads, buffers, first_step, config.values(), grad_multiplier,
                             found_inf)


def restore_adam_step_(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                       config: AdamConfig, grad_multiplier, found_inf) -> None:
    max_sqs = max_exp_avg_sqs if config.amsgrad else ()
    _ops().restore_adam_step_(params, backups, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, config.values(),
                              grad_multiplier, found_inf)


# ------------------------------------------------------- a step plan's lists on the C++ side (plan.py)


def step_lists(param_lists, params, without_grad, backups, bounds, positions, contiguous: bool):
    """A step plan's lists held in C++ (``_C.StepLists``, csrc/step_lists.cpp): ``param_lists`` the param
    groups' parameter lists, ``params`` the planned ones (``bounds``: each group's start and stop),
    ``without_grad`` the others, ``backups`` and ``positions`` (tensor indices) per planned parameter."""
    return _C.StepLists(param_lists, params, without_grad, backups, bounds, positions, contiguous)


def perturb_rows(lists, group: int, norm, step, config: PerturbConfig, kept: bytes | None) -> None:
    """``perturb_`` over group ``group`` of a plan's C++ lists (its ``kept`` rows: one byte per planned
    parameter, None for all), along their collected gradients."""
    seed_lo, seed_hi = split_u64(config.seed)
    lists.perturb(group, norm, step, config.rho, config.eps, config.keep_threshold, config.scale_factor,
                  config.normalize, config.adaptive, config.adaptive_eta, seed_lo, seed_hi, kept)


def philox4x32_10(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """The kernels' own Philox4x32-10 on an int64 (N, 4) tensor of counter words; returns (N, 4) words."""
    return _ops().philox4x32_10(counters, int(key[0]), int(key[1]))


# ---------------------------------------------------------------------------- fake implementations

if _C is not None:

    @torch.library.register_fake("sam_kernels::grad_norm")
    def _grad_norm_fake(grads: Sequence[torch.Tensor], weights, adaptive_eta):
        if grads:
            return grads[0].new_empty((), dtype=torch.float32), grads[0].new_empty((), dtype=torch.float32)
        return torch.empty((), dtype=torch.float32), torch.empty((), dtype=torch.float32)

    @torch.library.register_fake("sam_kernels::perturb_")
    def _perturb_fake(params, grads, backups, tensor_indices, norm, step, rho, eps, keep_threshold,
                      scale_factor, normalize, adaptive, adaptive_eta, seed_lo, seed_hi):
        return None

    @torch.library.register_fake("sam_kernels::gaussian_noise_")
    def _gaussian_noise_fake(params, backups, scales, tensor_indices, step, config, seed_lo, seed_hi):
        return None

    @torch.library.register_fake("sam_kernels::restore_")
    def _restore_fake(params, backups):
        return None

    @torch.library.register_fake("sam_kernels::restore_sgd_step_")
    def _restore_sgd_step_fake(params, backups, grads, momentum_buffers, first_step, config, grad_multiplier,
                               found_inf):
        return None

    @torch.library.register_fake("sam_kernels::restore_adam_step_")
    def _restore_adam_step_fake(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, config,
                                grad_multiplier, found_inf):
        return None

    @torch.library.register_fake("sam_kernels::philox4x32_10")
    def _philox_fake(counters, key0, key1):
        return counters.new_empty(counters.shape)
