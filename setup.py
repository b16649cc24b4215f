"""Build script: the pure-Python package plus the native extension ``sam_kernels._C`` from csrc/.

What gets built (printed at build time; ``pip install -v`` shows it):

* ``SAM_KERNELS_SKIP_EXT=1``: nothing native; the pure-Python install runs the Triton and torch backends.
* otherwise the CPU part (csrc/*.cpp, csrc/cpu/) always. It compiles against the installed torch, so
  torch must be importable at build time: build with ``pip install --no-build-isolation`` (an isolated
  build environment has no torch, and one that downloaded its own could differ from the torch the
  extension later loads into); a build that cannot import torch stops with an error saying so;
* plus the CUDA part (csrc/cuda/) when torch is a CUDA build and the CUDA toolkit (nvcc) is found
  through ``CUDA_HOME`` (or torch's own search), unless ``SAM_KERNELS_NO_CUDA=1``.
  ``SAM_KERNELS_FORCE_CUDA=1`` makes a missing CUDA part an error instead of a CPU-only build.
  ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default here: "8.0;9.0+PTX"); ``MAX_JOBS`` caps
  the parallel compile jobs.

Writing metadata or the source archive (``egg_info``, ``dist_info``, ``sdist``) compiles nothing and needs
no torch; MANIFEST.in lists what the source archive carries.
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
#: setup.py commands that write metadata or a source archive only.
METADATA_COMMANDS = frozenset({"egg_info", "dist_info", "sdist"})
#: setup.py commands that build or install, and so compile the extension.
BUILD_COMMANDS = frozenset({"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "editable_wheel",
                            "develop", "install"})


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(message: str) -> None:
    print(f"sam_kernels: {message}", flush=True)


def _cuda_decision(torch, cpp_extension) -> tuple[bool, str]:
    """(build the CUDA part?, why)."""
    if _flag("SAM_KERNELS_NO_CUDA"):
        return False, "SAM_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda)"
    nvcc = Path(cuda_home) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
    if not nvcc.exists():
        return False, f"CUDA_HOME={cuda_home} has no bin/nvcc"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}) and nvcc at {nvcc}"


def metadata_only(argv: list[str]) -> bool:
    """Whether the setup.py command line ``argv`` writes metadata or a source archive only: no compile, so
    no torch needed (the PEP 517 hooks run ``egg_info``, ``dist_info`` and ``sdist`` this way)."""
    words = set(argv[1:])
    return bool(words & METADATA_COMMANDS) and not words & BUILD_COMMANDS


def native_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) of the native extension, or nothing when it is skipped."""
    if _flag("SAM_KERNELS_SKIP_EXT"):
        _say("SAM_KERNELS_SKIP_EXT=1, building no native extension (pure Python install)")
        return [], {}
    if metadata_only(sys.argv):
        return [], {}
    force_cuda = _flag("SAM_KERNELS_FORCE_CUDA")
    if force_cuda and _flag("SAM_KERNELS_NO_CUDA"):
        raise RuntimeError("SAM_KERNELS_FORCE_CUDA=1 and SAM_KERNELS_NO_CUDA=1 contradict each other")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        raise RuntimeError(
            f"sam_kernels: torch is not importable at build time ({error}). The native extension compiles "
            f"against the installed torch ({sys.executable} cannot import it): install torch first, then "
            "build with `pip install --no-build-isolation .` (an isolated build environment has no torch); "
            "or set SAM_KERNELS_SKIP_EXT=1 for a pure-Python install (Triton and torch backends)."
        ) from error

    csrc = ROOT / "csrc"
    sources = [*(csrc / name for name in ("ops.cpp", "step_lists.cpp", "grad_marks.cpp")),
               *sorted((csrc / "cpu").glob("*.cpp"))]
    with_cuda, why = _cuda_decision(torch, cpp_extension)
    if force_cuda and not with_cuda:
        raise RuntimeError(f"SAM_KERNELS_FORCE_CUDA=1 but the CUDA part cannot be built: {why}")

    # NOTE: -ffp-contract=off keeps the CPU math free of FMA contraction (also in the AVX2/AVX-512 clones
    # of the loops, see csrc/cpu/ops_cpu.cpp), so fp32 results match the pure-torch reference bit for bit;
    # -fno-math-errno and -fno-trapping-math let sqrtf and the selects of the loops vectorize (no FP
    # exception flags or errno are read anywhere).
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                 "-DSAMK_BUILD_TOOL=setuptools"]
    include_dirs = [str(csrc), str(csrc / "include")]
    if sys.platform == "win32":
        cxx_flags = ["/O2", "/openmp", "/DSAMK_BUILD_TOOL=setuptools"]
    extra_link_args = [] if sys.platform == "win32" else ["-fopenmp"]

    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if not archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs = DEFAULT_CUDA_ARCHS
            arch_note = f"{archs} (default; set TORCH_CUDA_ARCH_LIST to change)"
        else:
            arch_note = f"{archs} (from TORCH_CUDA_ARCH_LIST)"
        sources += [*sorted((csrc / "cuda").glob("*.cpp")), *sorted((csrc / "cuda").glob("*.cu"))]
        cxx_flags.append("-DSAMK_WITH_CUDA")
        nvcc_flags = ["-O3", "-DSAMK_WITH_CUDA"]
        _say(f"building the CPU and CUDA parts of sam_kernels._C: {why}; CUDA architectures {arch_note}")
        extension = cpp_extension.CUDAExtension(
            "sam_kernels._C", [str(s.relative_to(ROOT)) for s in sources], include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=extra_link_args)
    else:
        _say(f"building the CPU part of sam_kernels._C only: no CUDA part because {why}")
        extension = cpp_extension.CppExtension(
            "sam_kernels._C", [str(s.relative_to(ROOT)) for s in sources], include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=extra_link_args)
    _say(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(unset: ninja picks)')}")
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
