"""The native CUDA kernels as machine code, checked without a GPU: csrc/cuda/kernels.cu is compiled to
cubin for sm_80 and sm_90 (it includes CUDA and the project's own headers only, no torch), disassembled
with cuobjdump, and every kernel instantiation (each dtype and option) must

* move its tensors with 128-bit global loads and stores (LDG.E.128 / STG.E.128, also with a cache suffix
  such as .CONSTANT for the read-only path): at least one vector load per operand it reads and one vector
  store per operand it writes;
* use no local memory: no LDL/STL in the SASS, and ptxas reports no stack frame and no spills;
* stay within 128 registers per thread, what a 512-thread block (kThreads) may use of an SM's 64K
  registers (__launch_bounds__ makes ptxas hold that bound, by spilling if need be, which the previous
  check catches).

Needs nvcc (CUDA_HOME, /usr/local/cuda or PATH) and cuobjdump (the toolkit's, or the copy Triton ships);
the test skips with the reason when either is missing (fails under ``SAM_KERNELS_EXPECT_CUDA=1``, as CI
runs it). It needs neither a GPU nor torch's CUDA runtime; nvcc runs once per architecture, both at once.
The flags are setup.py's CUDA build where they matter for code generation: -O3, the C++ standard
torch's cpp_extension passes, torch's common nvcc flags (the half/bfloat16 operator macros), the include
dirs, and no fast-math.

Run as a script (``python python_tests/backends/test_cuda_sass.py [csrc dir]``) it prints, per kernel,
the static counts of vector (128-bit) and scalar global loads and stores.

The checks of the machine code are marked slow (``pytest -m slow``): nvcc compiles the whole kernel file
twice (about 15 s on two cores).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCHS = ("80", "90")
#: Registers per thread a 512-thread block may use (64K registers / 512).
MAX_REGISTERS = 128

#: setup.py's own nvcc flags (its `nvcc_flags`, checked below) and the C++ standard torch's cpp_extension
#: passes to nvcc.
SETUP_NVCC_FLAGS = ["-O3", "-DSAMK_WITH_CUDA", "-std=c++20"]
#: torch.utils.cpp_extension.COMMON_NVCC_FLAGS as of torch 2.14 (checked below against the installed torch):
#: the half/bfloat16 operator macros change which conversions the headers define.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


def nvcc_flags() -> list[str]:
    """The code-generation flags of setup.py's CUDA build; no fast-math."""
    return [*SETUP_NVCC_FLAGS, *TORCH_NVCC_FLAGS]


def _toolkit_dirs() -> list[Path]:
    dirs = [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    return [*dirs, Path("/usr/local/cuda/bin")]


def find_tool(name: str) -> str | None:
    """A CUDA tool from the toolkit, PATH, or (cuobjdump) the copy in Triton's NVIDIA backend."""
    for d in _toolkit_dirs():
        if (d / name).is_file():
            return str(d / name)
    found = shutil.which(name)
    if found:
        return found
    spec = importlib.util.find_spec("triton")  # no import: only where its files are
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    return None


# ---------------------------------------------------------------------------------------- parsing

KERNELS = ("sumsq_partials_kernel", "perturb_kernel", "restore_kernel", "sgd_kernel", "adam_kernel",
           "finish_norm_kernel", "philox_kernel", "noise_kernel")
_TYPE_NAMES = {"f": "fp32", "d": "fp64", "__half": "fp16", "__nv_bfloat16": "bf16", "t": "b16", "j": "b32",
               "m": "b64"}
_NAME = re.compile(r"\d+(" + "|".join(KERNELS) + r")(I?)")


def _template_args(mangled: str, start: int) -> list[str]:
    """The template arguments of an Itanium-mangled name whose list opens (after 'I') at ``start``:
    builtin type codes, length-prefixed class names, and literals L<type><value>E."""
    args, i = [], start
    while mangled[i] != "E":
        if mangled[i] == "L":
            end = mangled.index("E", i)
            args.append(mangled[i + 1:end])
            i = end + 1
        elif mangled[i].isdigit():
            digits = re.match(r"\d+", mangled[i:]).group()
            i += len(digits)
            args.append(mangled[i:i + int(digits)])
            i += int(digits)
        else:
            args.append(mangled[i])
            i += 1
    return args


def kernel_label(mangled: str) -> str:
    """'perturb<bf16,adaptive,masked>'-style name of a kernel instantiation."""
    match = _NAME.search(mangled)
    if match is None:
        return mangled
    name = match.group(1).removesuffix("_kernel")
    if not match.group(2):
        return name
    raw = _template_args(mangled, match.end())
    dtype = _TYPE_NAMES.get(raw[0], raw[0])
    options = {"sumsq_partials": ["adaptive"], "perturb": ["adaptive", "masked"], "sgd": ["momentum"],
               "adam": ["amsgrad"], "noise": ["precision"]}.get(name, [])
    flags = [option for option, value in zip(options, raw[1:], strict=False) if value == "b1"]
    return f"{name}<{','.join([dtype, *flags])}>"


def expected_labels() -> list[str]:
    """Every instantiation the launchers of kernels.cu can launch."""
    dtypes = ["fp32", "fp64", "fp16", "bf16"]
    labels = []
    for dtype in dtypes:
        labels += [f"sumsq_partials<{dtype}>", f"sumsq_partials<{dtype},adaptive>"]
        labels += [f"perturb<{','.join([dtype, *flags])}>"
                   for flags in ([], ["masked"], ["adaptive"], ["adaptive", "masked"])]
        labels += [f"sgd<{dtype}>", f"sgd<{dtype},momentum>", f"adam<{dtype}>", f"adam<{dtype},amsgrad>"]
        labels += [f"noise<{dtype}>", f"noise<{dtype},precision>"]
    labels += ["restore<b16>", "restore<b32>", "restore<b64>", "finish_norm", "philox"]
    return labels


def tensor_operands(label: str) -> tuple[int, int]:
    """(operands read, operands written) of the tensor-moving kernels; (0, 0) for the others."""
    name, _, rest = label.partition("<")
    flags = set(rest.rstrip(">").split(",")[1:])
    if name == "sumsq_partials":
        return (2 if "adaptive" in flags else 1), 0
    if name == "perturb":
        return 2, 2  # param and grad; backup and param
    if name == "restore":
        return 1, 1
    if name == "noise":
        return 2, 2  # param and scale; backup and param
    if name == "sgd":
        return (3, 2) if "momentum" in flags else (2, 1)
    if name == "adam":
        return (5, 4) if "amsgrad" in flags else (4, 3)
    return 0, 0


@dataclass
class KernelCode:
    label: str
    registers: int = -1
    stack_bytes: int = -1
    spill_bytes: int = -1
    opcodes: list[str] = field(default_factory=list)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for op in self.opcodes if regex.fullmatch(op))

    @property
    def vector_loads(self) -> int:
        return self.count(r"LDG(\.\w+)*\.128(\.\w+)*")

    @property
    def scalar_loads(self) -> int:
        return self.count(r"LDG(\.\w+)*") - self.vector_loads

    @property
    def vector_stores(self) -> int:
        return self.count(r"STG(\.\w+)*\.128(\.\w+)*")

    @property
    def scalar_stores(self) -> int:
        return self.count(r"STG(\.\w+)*") - self.vector_stores

    @property
    def local_accesses(self) -> int:
        return self.count(r"(LDL|STL)(\.\w+)*")


_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def parse_sass(text: str) -> dict[str, list[str]]:
    """mangled kernel name -> opcodes (with modifiers) of its SASS, from `cuobjdump -sass`."""
    kernels: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.search(r"Function : (\S+)", line)
        if header:
            current = kernels.setdefault(header.group(1), [])
            continue
        match = _SASS_OPCODE.search(line)
        if match and current is not None:
            current.append(match.group(1))
    return kernels


def parse_ptxas(text: str) -> dict[str, tuple[int, int, int]]:
    """mangled kernel name -> (registers, stack frame bytes, spill bytes) from `-Xptxas -v`."""
    info: dict[str, list[int]] = {}
    current = None
    for line in text.splitlines():
        if m := re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line):
            current = info.setdefault(m.group(1), [-1, -1, -1])
        elif current is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                                     r"(\d+) bytes spill loads", line)):
            current[1] = int(m.group(1))
            current[2] = int(m.group(2)) + int(m.group(3))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current[0] = int(m.group(1))
    return {name: tuple(values) for name, values in info.items()}


def compile_kernels(csrc: Path, arch: str, workdir: Path, nvcc: str, cuobjdump: str) -> dict[str, KernelCode]:
    """label -> KernelCode of every kernel in csrc/cuda/kernels.cu for sm_<arch>."""
    cubin = workdir / f"kernels_sm{arch}.cubin"
    command = [nvcc, "-cubin", f"-arch=sm_{arch}", *nvcc_flags(), "-Xptxas", "-v", f"-I{csrc}",
               f"-I{csrc / 'include'}", str(csrc / "cuda" / "kernels.cu"), "-o", str(cubin)]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"nvcc failed for sm_{arch}:\n{built.stderr[-4000:]}"
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    resources = parse_ptxas(built.stderr)
    result = {}
    for mangled, opcodes in parse_sass(sass).items():
        code = KernelCode(kernel_label(mangled), opcodes=opcodes)
        code.registers, code.stack_bytes, code.spill_bytes = resources.get(mangled, (-1, -1, -1))
        result[code.label] = code
    return result


def compile_all(csrc: Path, workdir: Path, nvcc: str, cuobjdump: str) -> dict[str, dict[str, KernelCode]]:
    """Both architectures, compiled concurrently (each nvcc run is single-threaded)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(ARCHS)) as pool:
        futures = {arch: pool.submit(compile_kernels, csrc, arch, workdir, nvcc, cuobjdump) for arch in ARCHS}
        return {arch: future.result() for arch, future in futures.items()}


# ------------------------------------------------------------------------------------------ tests

NVCC = find_tool("nvcc")
CUOBJDUMP = find_tool("cuobjdump")


@pytest.fixture(scope="module")
def compiled():
    """Both architectures' kernels, compiled once for the module (about 15 s on two cores)."""
    if NVCC is None or CUOBJDUMP is None:
        from targets import EXPECT_CUDA  # here, not at the top: the file also runs as a plain script

        why = (f"needs the CUDA toolkit's nvcc and cuobjdump (nvcc: {NVCC or 'not found'}, cuobjdump: "
               f"{CUOBJDUMP or 'not found'}); set CUDA_HOME to the toolkit")
        if EXPECT_CUDA:
            pytest.fail(f"SAM_KERNELS_EXPECT_CUDA=1 but the SASS checks cannot run: {why}")
        pytest.skip(why)
    with tempfile.TemporaryDirectory() as workdir:
        yield compile_all(CSRC, Path(workdir), NVCC, CUOBJDUMP)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_instantiation_is_compiled(compiled, arch):
    assert sorted(compiled[arch]) == sorted(expected_labels())


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "label"), list(itertools.product(ARCHS, expected_labels())))
def test_kernel_machine_code(compiled, arch, label):
    code = compiled[arch].get(label)
    assert code is not None, f"{label} is missing from the sm_{arch} cubin"
    assert code.registers >= 0 and code.spill_bytes >= 0, f"{label}: no ptxas resource line"
    assert code.local_accesses == 0, f"{label} on sm_{arch}: local memory accesses (LDL/STL) in the SASS"
    assert code.stack_bytes == 0 and code.spill_bytes == 0, (
        f"{label} on sm_{arch}: {code.stack_bytes} bytes stack frame, {code.spill_bytes} bytes spilled")
    assert code.registers <= MAX_REGISTERS, f"{label} on sm_{arch}: {code.registers} registers"
    reads, writes = tensor_operands(label)
    assert code.vector_loads >= reads, (
        f"{label} on sm_{arch}: {code.vector_loads} 128-bit global loads for {reads} operands read")
    assert code.vector_stores >= writes, (
        f"{label} on sm_{arch}: {code.vector_stores} 128-bit global stores for {writes} operands written")


def noise_kernel_ptx(csrc: Path, arch: str, workdir: Path, nvcc: str) -> dict[str, str]:
    """mangled name -> PTX body of each Gaussian noise kernel of csrc/cuda/kernels.cu for sm_<arch>."""
    ptx = workdir / f"kernels_sm{arch}.ptx"
    command = [nvcc, "-ptx", f"-arch=sm_{arch}", *nvcc_flags(), f"-I{csrc}", f"-I{csrc / 'include'}",
               str(csrc / "cuda" / "kernels.cu"), "-o", str(ptx)]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"nvcc -ptx failed for sm_{arch}:\n{built.stderr[-4000:]}"
    bodies = {}
    for chunk in ptx.read_text().split(".entry ")[1:]:
        name = chunk.split("(", 1)[0].strip()
        if "noise_kernel" in name:
            bodies[name] = chunk
    return bodies


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_noise_kernels_contract_nothing(arch):
    """NOTE (noise contract): the Gaussian noise is bit-identical across backends only if no multiply-add
    of the Box-Muller transform (or of w + sigma * z) becomes an FMA and division and sqrt are correctly
    rounded. In the PTX (before ptxas expands an IEEE division or root into its own exact sequence): no
    fma, no approximate division, root, logarithm or sine, and the .rn division and root are there."""
    if NVCC is None:
        pytest.skip("needs the CUDA toolkit's nvcc")
    with tempfile.TemporaryDirectory() as workdir:
        bodies = noise_kernel_ptx(CSRC, arch, Path(workdir), NVCC)
    assert len(bodies) == 8, sorted(bodies)  # 4 dtypes x (std, precision)
    for name, body in bodies.items():
        assert not re.search(r"\bfma\.", body), f"{name} on sm_{arch}: fma in the PTX"
        assert not re.search(r"\.approx\.", body), f"{name} on sm_{arch}: an approximate instruction"
        assert re.search(r"\bdiv\.rn\.f32\b", body) and re.search(r"\bsqrt\.rn\.f32\b", body), name


def test_flags_are_the_builds():
    """The flags above are still setup.py's and torch's (so the SASS checked is the SASS shipped)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    setup_flags = [ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "nvcc_flags" for t in node.targets)]
    assert setup_flags and set(setup_flags[0]) <= set(SETUP_NVCC_FLAGS), setup_flags
    assert not any("fast" in flag for flag in nvcc_flags())
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    assert set(cpp_extension.COMMON_NVCC_FLAGS) == set(TORCH_NVCC_FLAGS)


def test_label_parser():
    """The demangling the tests above rely on, on names as nvcc 13 mangles them."""
    prefix = "_ZN11sam_kernels4cuda43_GLOBAL__N__3e63768a_10_kernels_cu_87b183a7"
    assert kernel_label(prefix + "14perturb_kernelI13__nv_bfloat16Lb1ELb0EEEvNS0_10ChunkTableILi3EEE") == \
        "perturb<bf16,adaptive>"
    assert kernel_label(prefix + "10adam_kernelIdLb1ELi6EEEvNS0_10ChunkTableIXT1_EEE") == "adam<fp64,amsgrad>"
    assert kernel_label(prefix + "14restore_kernelItEEvNS0_10ChunkTableILi2EEE") == "restore<b16>"
    assert kernel_label(prefix + "18finish_norm_kernelEPKflPfS4_") == "finish_norm"


def main(argv: list[str]) -> int:
    """Prints the static vector/scalar global access counts per kernel for a csrc tree."""
    csrc = Path(argv[1]).resolve() if len(argv) > 1 else CSRC
    if NVCC is None or CUOBJDUMP is None:
        print("nvcc or cuobjdump not found", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as workdir:
        results = compile_all(csrc, Path(workdir), NVCC, CUOBJDUMP)
    print("| arch | kernel | LDG.128 | LDG other | STG.128 | STG other | regs | spill |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, kernels in results.items():
        for label, code in sorted(kernels.items()):
            counts = (code.vector_loads, code.scalar_loads, code.vector_stores, code.scalar_stores,
                      code.registers, code.spill_bytes)
            print(f"| sm_{arch} | {label} | " + " | ".join(map(str, counts)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
