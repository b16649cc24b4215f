"""Build script: the pure-Python package, plus the native extension from csrc/ when its sources exist.

NOTE: the native extension (CPU and CUDA kernels) is built by ``native_extensions()``; with no sources in
csrc/ yet, or with SAM_KERNELS_SKIP_EXT=1, the install is pure Python and the Triton and torch backends
are what runs.
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def native_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) of the native extension, or nothing when it is skipped or absent."""
    if os.environ.get("SAM_KERNELS_SKIP_EXT") == "1":
        print("sam_kernels: SAM_KERNELS_SKIP_EXT=1, building no native extension")
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    if not sources:
        print("sam_kernels: no native sources in csrc/, pure Python install")
        return [], {}
    raise RuntimeError("csrc/ has sources but setup.py has no rule to build them yet")


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
