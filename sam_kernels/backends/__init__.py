"""Backend registry: which implementation of the ops runs on a device, and why.

Backends:
  ``native``  the compiled extension ``sam_kernels._C`` (csrc/): CUDA kernels for CUDA tensors when it
              was built with its CUDA part, multithreaded vectorized C++ for CPU tensors.
  ``triton``  fused multi-tensor Triton kernels; CUDA tensors, or CPU tensors under the Triton
              interpreter (``TRITON_INTERPRET=1`` set before the first import, for testing).
  ``torch``   the pure-torch reference (``reference.py``); runs anywhere.

``auto`` picks, for CUDA tensors, the native CUDA kernels if built, else Triton, else the torch
reference; for CPU tensors the native CPU kernels if built, else the torch reference (the Triton
interpreter is a correctness tool, far slower than torch). ``SAM_KERNELS_BACKEND`` overrides ``auto``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

BACKEND_ENV = "SAM_KERNELS_BACKEND"
BACKEND_NAMES = ("native", "triton", "torch")
_MODULES = {"native": "native_backend", "triton": "triton_backend", "torch": "reference"}
#: Whether the triton package is installed, looked up once. NOTE: not at each call: torch.compile traces
#: the ops' choice of a backend, and dynamo refuses to trace importlib.util.find_spec (torch 2.11 does).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_status(device_type: str) -> tuple[bool, str]:
    """Whether the Triton backend can run on this device type, and why (not)."""
    if not TRITON_INSTALLED:
        return False, "the triton package is not installed"
    if device_type == "cuda":
        return True, "triton is installed and the tensors are on a CUDA device"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter"
        return False, "CPU tensors need TRITON_INTERPRET=1 set before sam_kernels is imported"
    return False, f"Triton has no support for device type {device_type!r}"


def native_status(device_type: str) -> tuple[bool, str]:
    """Whether the native extension can run on this device type, and why (not)."""
    return get("native").status(device_type)


def resolve(device: torch.device, requested: str | None = None) -> tuple[str, str]:
    """(backend name, reason) for tensors on ``device``; ``requested`` None or "auto" means automatic."""
    env = os.environ.get(BACKEND_ENV, "").strip().lower()
    name = (requested or "auto").lower()
    source = "backend argument"
    if name == "auto" and env and env != "auto":
        name, source = env, f"{BACKEND_ENV}={env}"
    if name == "auto":
        native_ok, native_why = native_status(device.type)
        if native_ok:
            return "native", f"auto: {native_why}"
        ok, why = triton_status(device.type)
        if device.type == "cuda" and ok:
            return "triton", f"auto: {why} (native: {native_why})"
        return "torch", f"auto: torch reference on {device.type} (native: {native_why}; triton: {why})"
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source}: unknown backend {name!r}; choose one of 'auto', "
                         + ", ".join(repr(n) for n in BACKEND_NAMES))
    if name == "native":
        ok, why = native_status(device.type)
        if not ok:
            raise RuntimeError(f"{source} asks for the native backend, but {why}; "
                               "use backend='auto', 'triton' or 'torch'")
        return name, f"{source}: {why}"
    if name == "triton":
        ok, why = triton_status(device.type)
        if not ok:
            raise RuntimeError(f"{source} asks for the triton backend, but {why}; "
                               "use backend='torch' or 'auto'")
        return name, f"{source}: {why}"
    return name, f"{source}: pure-torch reference"


_loaded: dict[str, ModuleType] = {}


def get(name: str) -> ModuleType:
    """The module that implements backend ``name`` (imported on first use).

    NOTE: an imported module is found by dict lookups, which torch.compile can trace (it cannot trace
    an import).
    """
    module = _loaded.get(name)
    if module is None:
        full_name = f"{__name__}.{_MODULES[name]}"
        module = sys.modules.get(full_name) or importlib.import_module(full_name)
        _loaded[name] = module
    return module


def report() -> str:
    """Human-readable summary of the backends and the automatic choice on each present device."""
    lines = [f"{BACKEND_ENV}={os.environ.get(BACKEND_ENV, '') or '(unset)'}",
             f"native extension sam_kernels._C: {get('native').describe()}"]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        ok, why = native_status(device.type)
        lines.append(f"{device.type}: native {'available' if ok else 'unavailable'} ({why})")
        ok, why = triton_status(device.type)
        lines.append(f"{device.type}: triton {'available' if ok else 'unavailable'} ({why})")
        try:
            name, reason = resolve(device)
            lines.append(f"{device.type}: runs {name!r} ({reason})")
        except (ValueError, RuntimeError) as error:
            lines.append(f"{device.type}: {error}")
    return "\n".join(lines)
