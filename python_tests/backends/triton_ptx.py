"""Compiles Triton kernels of the backend ahead of time for an NVIDIA GPU that need not be present and
prints, as JSON, how often chosen PTX instructions occur. Run as a script (Triton must not be in
interpreter mode): ``python python_tests/backends/triton_ptx.py [sm]``."""

import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sam_kernels.backends import triton_kernels

#: Instruction patterns counted in the PTX.
PATTERNS = {"div.rn.f32": r"div\.rn\.f32", "div.full.f32": r"div\.full\.f32", "div.approx": r"div\.approx",
            "max.NaN.f32": r"max\.NaN\.f32", "max.f32": r"max\.f32"}
POINTERS = "*i64"


def compile_ptx(fn, runtime: dict[str, str], constants: dict, sm: int) -> str:
    signature = dict(runtime)
    signature.update({name: "constexpr" for name in constants})
    constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", sm, 32)).asm["ptx"]


def kernels() -> dict:
    """Name -> (function, runtime signature, constexprs) of the variants checked."""
    adam = {name: POINTERS for name in ("param_ptrs", "backup_ptrs", "grad_ptrs", "exp_avg_ptrs",
                                        "exp_avg_sq_ptrs", "max_exp_avg_sq_ptrs", "step_ptrs", "numels",
                                        "chunk_tensor", "chunk_start")}
    adam.update({"multiplier_ptr": "*fp32", "found_inf_ptr": "*fp32"})
    adam.update({name: "fp32" for name in ("lr", "beta1", "beta2", "log2_beta1", "log2_beta2", "eps",
                                           "weight_decay")})
    perturb = {name: POINTERS for name in ("param_ptrs", "grad_ptrs", "backup_ptrs", "numels",
                                           "tensor_ids", "chunk_tensor", "chunk_start")}
    perturb.update({"norm_ptr": "*fp32", "step_ptr": "*i64"})
    perturb.update({name: "fp32" for name in ("rho", "eps", "scale_factor", "adaptive_eta")})
    perturb.update({name: "i64" for name in ("seed_lo", "seed_hi", "keep_threshold")})
    common = {"PARAM_DTYPE": tl.float32, "GRAD_DTYPE": tl.float32, "CHUNK": 16384, "BLOCK": 1024}
    return {
        "restore_adam_amsgrad": (triton_kernels.restore_adam_kernel, adam,
                                 {**common, "DECOUPLED": True, "AMSGRAD": True, "MAXIMIZE": False,
                                  "HAS_MULTIPLIER": True, "HAS_FOUND_INF": True}),
        "perturb_normalized": (triton_kernels.perturb_kernel, perturb,
                               {**common, "NORMALIZE": True, "ADAPTIVE": True, "MASKED": True}),
    }


def main() -> None:
    sm = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    counts = {}
    for name, (fn, runtime, constants) in kernels().items():
        ptx = compile_ptx(fn, runtime, constants, sm)
        counts[name] = {key: len(re.findall(pattern, ptx)) for key, pattern in PATTERNS.items()}
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
