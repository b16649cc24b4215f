"""Compiles every Triton kernel variant of the backend ahead of time for an NVIDIA GPU that need not be
present and prints, as JSON, per variant: how often chosen PTX instructions occur, and (when the CUDA
toolkit's ptxas is found) the registers and spill bytes ptxas reports. Run as a script (Triton must not
be in interpreter mode): ``python python_tests/backends/triton_ptx.py [sm] [name prefix]``."""

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sam_kernels.backends import triton_backend, triton_kernels

#: Instruction patterns counted in the PTX.
PATTERNS = {
    "div.rn.f32": r"div\.rn\.f32", "div.rn.f64": r"div\.rn\.f64", "div.full.f32": r"div\.full\.f32",
    "div.approx": r"div\.approx",
    "max.NaN.f32": r"max\.NaN\.f32", "max.f32": r"max\.f32",
    # 128-bit global accesses: the aligned path's loads and stores, for every dtype.
    "ld.v4.b32": r"ld\.global(?:\.\w+)*\.v4\.b32", "st.v4.b32": r"st\.global(?:\.\w+)*\.v4\.b32",
    "ld.v2.b64": r"ld\.global(?:\.\w+)*\.v2\.b64", "st.v2.b64": r"st\.global(?:\.\w+)*\.v2\.b64",
    "ld.scalar": r"ld\.global(?:\.\w+)*\.b(?:16|32|64)\s", "local": r"\.local",
    # fp32 exp2 is an approximate instruction; Adam's bias corrections must not use it.
    "ex2.approx": r"ex2\.approx",
    # The Gaussian noise contract: no contracted multiply-add, IEEE division and root, no approximations.
    "fma": r"\bfma\.", "sqrt.rn.f32": r"sqrt\.rn\.f32", "approx": r"\.approx\.",
}
POINTERS = "*i64"
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}


def compile_ptx(fn, runtime: dict[str, str], constants: dict, sm: int) -> str:
    """PTX of ``fn`` for sm_<sm>, with the warps the backend launches it with."""
    signature = dict(runtime)
    signature.update({name: "constexpr" for name in constants})
    constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn, signature=signature, constexprs=constexprs)
    torch_dtype = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16,
                   tl.float64: torch.float64}
    dtype = constants.get("PARAM_DTYPE", constants.get("GRAD_DTYPE"))
    options = {"num_warps": triton_backend.num_warps(torch_dtype[dtype])}
    if fn is triton_kernels.restore_adam_kernel:
        options["maxnreg"] = triton_backend.ADAM_MAX_REGISTERS  # as the backend launches it
    if fn is triton_kernels.noise_kernel:
        options["enable_fp_fusion"] = False  # as the backend launches it (the noise contract)
        options["maxnreg"] = triton_backend.NOISE_MAX_REGISTERS
    return triton.compile(source, target=GPUTarget("cuda", sm, 32), options=options).asm["ptx"]


def _signature(pointers, device_scalars=(), floats=(), ints=(), doubles=()) -> dict:
    signature = {name: POINTERS for name in pointers}
    signature.update({name: "*fp32" for name in device_scalars})
    signature.update({name: "fp32" for name in floats})
    signature.update({name: "fp64" for name in doubles})  # the kernels' tl.float64-annotated arguments
    signature.update({name: "i64" for name in ints})
    return signature


def kernels():
    """(name, function, runtime signature, constexprs) of every variant the backend can launch, for
    each dtype, on the aligned path (``ALIGNED``) and, for one representative each, the general one."""
    blocks = {"CHUNK": triton_backend.CHUNK, "BLOCK": triton_backend.BLOCK}
    sumsq = _signature(["grad_ptrs", "weight_ptrs", "numels", "chunk_tensor", "chunk_start", "partials"],
                       floats=["adaptive_eta"], ints=["partial_offset"])
    sumsq["partials"] = "*fp32"
    perturb = _signature(["param_ptrs", "grad_ptrs", "backup_ptrs", "numels", "tensor_ids", "chunk_tensor",
                          "chunk_start", "step_ptr"], ["norm_ptr"],
                         ints=["seed_lo", "seed_hi", "keep_threshold"],
                         doubles=["rho", "eps", "scale_factor", "adaptive_eta"])
    restore = _signature(["param_ptrs", "backup_ptrs", "numels", "chunk_tensor", "chunk_start"])
    sgd = _signature(["param_ptrs", "backup_ptrs", "grad_ptrs", "buf_ptrs", "numels", "first_step",
                      "chunk_tensor", "chunk_start"], ["multiplier_ptr", "found_inf_ptr"],
                     doubles=["lr", "momentum", "one_minus_dampening", "weight_decay"])
    adam = _signature(["param_ptrs", "backup_ptrs", "grad_ptrs", "exp_avg_ptrs", "exp_avg_sq_ptrs",
                       "max_exp_avg_sq_ptrs", "step_ptrs", "numels", "chunk_tensor", "chunk_start"],
                      ["multiplier_ptr", "found_inf_ptr"],
                      doubles=["lr", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps",
                               "weight_decay", "decay_factor"])
    noise = _signature(["param_ptrs", "backup_ptrs", "scale_ptrs", "numels", "tensor_ids", "chunk_tensor",
                        "chunk_start", "step_ptr"], ints=["seed_lo", "seed_hi"], doubles=["factor"])
    variants = []
    for (dname, dtype), aligned in itertools.product(DTYPES.items(), (True, False)):
        if not aligned and dname != "fp32":
            continue
        tag = f"{dname}{'' if aligned else '_unaligned'}"
        typed = {**blocks, "ALIGNED": aligned}
        compute = {"COMPUTE": tl.float64 if dtype == tl.float64 else tl.float32}
        for adaptive in (False, True):
            variants.append((f"sumsq_{'adaptive_' if adaptive else ''}{tag}",
                             triton_kernels.sumsq_partials_kernel, sumsq,
                             {**typed, "GRAD_DTYPE": dtype, "WEIGHT_DTYPE": dtype, "ADAPTIVE": adaptive}))
        for normalize, adaptive, masked in itertools.product((True, False), repeat=3):
            variants.append((f"perturb_n{int(normalize)}a{int(adaptive)}m{int(masked)}_{tag}",
                             triton_kernels.perturb_kernel, perturb,
                             {**typed, **compute, "PARAM_DTYPE": dtype, "GRAD_DTYPE": dtype,
                              "NORMALIZE": normalize,
                              "ADAPTIVE": adaptive, "MASKED": masked}))
        variants.append((f"restore_{tag}", triton_kernels.restore_kernel, restore,
                         {**typed, "PARAM_DTYPE": dtype}))
        for precision in (False, True):
            variants.append((f"noise_p{int(precision)}_{tag}", triton_kernels.noise_kernel, noise,
                             {**typed, **compute, "PARAM_DTYPE": dtype, "PRECISION": precision}))
        for momentum, nesterov, scalars in itertools.product((True, False), (True, False), (True, False)):
            if nesterov and not momentum:
                continue
            variants.append((f"sgd_m{int(momentum)}n{int(nesterov)}s{int(scalars)}_{tag}",
                             triton_kernels.restore_sgd_kernel, sgd,
                             {**typed, **compute, "PARAM_DTYPE": dtype, "GRAD_DTYPE": dtype,
                              "HAS_MOMENTUM": momentum, "HAS_WEIGHT_DECAY": True, "NESTEROV": nesterov,
                              "MAXIMIZE": False, "HAS_MULTIPLIER": scalars,
                              "HAS_FOUND_INF": scalars}))
        for decoupled, amsgrad, scalars in itertools.product((True, False), repeat=3):
            variants.append((f"adam_d{int(decoupled)}a{int(amsgrad)}s{int(scalars)}_{tag}",
                             triton_kernels.restore_adam_kernel, adam,
                             {**typed, **compute, "PARAM_DTYPE": dtype, "GRAD_DTYPE": dtype,
                              "HAS_WEIGHT_DECAY": True, "DECOUPLED": decoupled,
                              "AMSGRAD": amsgrad, "MAXIMIZE": False, "HAS_MULTIPLIER": scalars,
                              "HAS_FOUND_INF": scalars}))
    return variants


def _ptxas() -> str | None:
    """The ptxas Triton itself assembles with (it ships one), else the CUDA toolkit's."""
    shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for candidate in (shipped, shutil.which("ptxas"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def ptxas_report(ptx: str, sm: int) -> dict | None:
    """Registers and spill bytes as ptxas reports them, or None without a ptxas."""
    ptxas = _ptxas()
    if ptxas is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        arch = re.search(r"\.target (sm_\w+)", ptx).group(1)  # sm_90a for Hopper's PTX
        # NOTE: the flags Triton itself assembles with (its NVIDIA compiler adds --regAllocOptLevel=2,
        # a ptxas 13 workaround), so the registers and spills are those of the kernels Triton loads.
        result = subprocess.run([ptxas, f"-arch={arch}", "-v", "--regAllocOptLevel=2", path, "-o",
                                 os.devnull], capture_output=True, text=True)
    text = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": sum(spills)}


def main() -> None:
    sm = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    only = sys.argv[2] if len(sys.argv) > 2 else ""  # a name prefix: compile just those variants
    counts = {}
    for name, fn, runtime, constants in kernels():
        if not name.startswith(only):
            continue
        ptx = compile_ptx(fn, runtime, constants, sm)
        counts[name] = {key: len(re.findall(pattern, ptx)) for key, pattern in PATTERNS.items()}
        report = ptxas_report(ptx, sm)
        if report is not None:
            counts[name].update(report)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
