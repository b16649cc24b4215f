"""``python -m sam_kernels.selftest``: check every kernel backend present on this machine against the
pure-torch reference, in a few minutes, and print PASS/FAIL lines plus one JSON record.

On a GPU: every op of the native and Triton CUDA backends against the reference (fp32, bf16, fp16;
1, 300 and 3000 tensors; one tensor above 2**31 elements when memory allows), the masks bit-equal
across backends, a whole SAM step captured in a CUDA graph and replayed against the same step run
eagerly, the fused ops' bandwidth as a share of a measured device copy, and the host cost of one SAM
iteration. On a CPU it runs the CPU parts (native CPU kernels, and Triton when ``TRITON_INTERPRET=1``
was set before the import) and lists what it skipped.

    python -m sam_kernels.selftest [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from . import backends, ops

#: (rtol, atol) per dtype for results computed in fp32 (fp64 for float64) and stored in the dtype (one
#: unit in the last place for the 16-bit types: backends may round the same fp32 value differently).
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-4),
             torch.float64: (1e-12, 1e-14)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Result:
    name: str
    passed: bool | None  # None: skipped
    detail: str = ""
    figures: dict = field(default_factory=dict)


def _tensors(count: int, dtype, device, seed: int, total: int = 3_000_000) -> list[torch.Tensor]:
    """``count`` tensors of varied, odd sizes adding up to about ``total`` elements."""
    sizes = torch.randint(1, max(2, 2 * total // count), (count,),
                          generator=torch.Generator().manual_seed(count)).tolist()
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator).to(device=device, dtype=dtype) for n in sizes]


def _close(actual: list[torch.Tensor], expected: list[torch.Tensor], dtype) -> str | None:
    rtol, atol = TOLERANCE[dtype]
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if not torch.allclose(a.double(), e.double(), rtol=rtol, atol=atol, equal_nan=True):
            worst = (a.double() - e.double()).abs().max().item()
            return f"tensor {i}: max abs difference {worst:.3g}"
    return None


def _same_bits(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> str | None:
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if not torch.equal(a, e):
            return f"tensor {i} differs"
    return None


def _clones(tensors):
    return [t.clone() for t in tensors]


def _interpreted(backend: str, device: torch.device) -> bool:
    """Triton on a CPU runs in its interpreter: correct, but far too slow for large sizes or timings."""
    return backend == "triton" and device.type == "cpu"


def check_ops(backend: str, device: torch.device, count: int, dtype) -> Result:
    """Norm, masked perturb and the fused SGD and Adam descents of ``backend`` against the reference."""
    name = f"ops {backend} {device.type} {count} tensors {str(dtype).removeprefix('torch.')}"
    total = 3_000_000 if device.type == "cuda" else 3_000 if _interpreted(backend, device) else 60_000
    params = _tensors(count, dtype, device, 1, total)
    grads = _tensors(count, dtype, device, 2, total)
    for g in grads:
        g.mul_(0.1)
    outcome = {}
    # NOTE: both perturb with the reference's norm: each backend's own differs in its last bits (another
    # summation order), which would otherwise show in the float64 weights.
    ref_norm = ops.grad_norm(params, grads, backend="torch")[0]
    for which in (backend, "torch"):
        norm, flag = ops.grad_norm(params, grads, backend=which)
        w, backups = _clones(params), [torch.empty_like(p) for p in params]
        ops.perturb_(w, backups, ref_norm, rho=0.05, grads=grads, keep_prob=0.5, seed=7, step=3,
                     backend=which)
        sgd_w = _clones(w)
        buffers = ops.restore_sgd_step_(sgd_w, backups, [torch.zeros_like(p) for p in params], lr=0.1,
                                        grads=grads, momentum=0.9, weight_decay=1e-4, backend=which)
        adam_w = _clones(w)
        state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])
        steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in params]
        ops.advance_adam_steps_(steps, None)
        ops.restore_adam_step_(adam_w, backups, *state, None, steps, lr=1e-3, grads=grads,
                               weight_decay=0.01, decoupled_weight_decay=True, backend=which)
        outcome[which] = (norm, flag, w, backups, sgd_w, buffers, adam_w, state)
    got, ref = outcome[backend], outcome["torch"]
    problems = [
        ("norm", _close([got[0]], [ref[0]], torch.float32)),
        ("found-inf flag", _same_bits([got[1]], [ref[1]])),
        ("perturbed weights", _close(got[2], ref[2], dtype)),
        ("backups", _same_bits(got[3], params)),
        ("SGD step", _close(got[4], ref[4], dtype)),
        ("momentum", _close(got[5], ref[5], dtype)),
        ("Adam step", _close(got[6], ref[6], dtype)),
        ("Adam moments", _close(got[7][0] + got[7][1], ref[7][0] + ref[7][1], dtype)),
    ]
    failures = [f"{what}: {why}" for what, why in problems if why is not None]
    return Result(name, not failures, "; ".join(failures))


def check_masks(device: torch.device, present: list[str]) -> Result:
    """The Bernoulli masks of every backend bit-equal (the mask contract), through perturb_."""
    params = [torch.zeros(n, device=device) for n in (1, 777, 70_001)]
    grads = [torch.ones_like(p) for p in params]
    masks = {}
    for which in present + ["torch"]:
        w = _clones(params)
        ops.perturb_(w, [torch.empty_like(p) for p in params], torch.ones((), device=device), rho=1.0,
                     grads=grads, normalize=False, keep_prob=0.3, seed=2**63 + 5, step=2**33 + 1,
                     backend=which)
        masks[which] = [t != 0 for t in w]
    failures = [which for which in present if _same_bits(masks[which], masks["torch"]) is not None]
    return Result(f"masks {device.type} {', '.join(present)} = torch", not failures,
                  f"differ: {failures}" if failures else "")


def check_large_tensor(backend: str, device: torch.device) -> Result:
    """One bf16 tensor above 2**31 elements: 64-bit offsets in the norm, perturb and restore."""
    n = 2**31 + 4099
    needed = 4 * n * 2  # param, grad, backup, copy in bf16
    name = f"large tensor {backend} ({n} elements)"
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    if free < needed * 1.3:
        return Result(name, None, f"needs {needed / 2**30:.1f} GiB free on a GPU")
    param = torch.ones(n, dtype=torch.bfloat16, device=device)
    grad = torch.full_like(param, 0.5)
    grad[-1] = 2.0
    backup = torch.empty_like(param)
    norm, _ = ops.grad_norm([param], [grad], backend=backend)
    expected = ((n - 1) * 0.25 + 4.0) ** 0.5
    ops.perturb_([param], [backup], norm, rho=1.0, grads=[grad], backend=backend)
    tail_moved = float(param[-1]) != 1.0 and float(param[0]) != 1.0
    ops.restore_([param], [backup], backend=backend)
    restored = bool((param == 1).all())
    ok = abs(float(norm) - expected) < 1e-3 * expected and tail_moved and restored
    del param, grad, backup
    return Result(name, ok, f"norm {float(norm):.1f} vs {expected:.1f}, last element perturbed "
                            f"{tail_moved}, restored {restored}")


def _sam_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10)).to(device)


def _sam_step(model, sam, x, y) -> None:
    """One two-call SAM step."""
    torch.nn.functional.cross_entropy(model(x), y).backward()
    sam.first_step(zero_grad=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    sam.second_step()


def check_cuda_graph(backend: str, device: torch.device) -> Result:
    """A whole SAM step (both passes, ascent and fused descent) captured once and replayed, against the
    same steps run eagerly: bit-equal weights."""
    from .optim import SAM

    x = torch.randn(32, 64, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    results = []
    for captured in (False, True):
        model = _sam_model(device)
        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend,
                  capturable=True)

        def step(model=model, sam=sam):
            _sam_step(model, sam, x, y)

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()  # NOTE: the warm-up step creates the momentum buffers before any capture
            if captured:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
        torch.cuda.current_stream(device).wait_stream(stream)
        for _ in range(3 if captured else 4):
            graph.replay() if captured else step()
        torch.cuda.synchronize(device)
        results.append([p.detach().clone() for p in model.parameters()])
    why = _same_bits(results[1], results[0])
    return Result(f"CUDA graph SAM step {backend}", why is None, why or "captured = eager, bit for bit")


def _time(fn: Callable[[], None], device: torch.device, repeats: int = 10) -> float:
    """Median seconds of ``fn``."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def check_bandwidth(backend: str, device: torch.device, elements: int) -> Result:
    """Perturb (reads w, g; writes w, backup) and the fused SGD descent (reads backup, g, buffer;
    writes w, buffer) as a share of a measured device copy's bandwidth, fp32."""
    params = [torch.randn(elements // 4, device=device) for _ in range(4)]
    grads, backups = _clones(params), [torch.empty_like(p) for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    norm = torch.ones((), device=device)
    source, target = torch.empty(elements, device=device), torch.empty(elements, device=device)
    copy_s = min(_time(lambda: target.copy_(source), device) for _ in range(3))
    copy_bw = 2 * 4 * elements / copy_s
    perturb_s = _time(lambda: ops.perturb_(params, backups, norm, rho=0.01, grads=grads, backend=backend),
                      device)
    sgd_s = _time(lambda: ops.restore_sgd_step_(params, backups, buffers, lr=0.0, grads=grads, momentum=0.9,
                                                backend=backend), device)
    figures = {"copy_GBps": copy_bw / 1e9, "perturb_GBps": 4 * 4 * elements / perturb_s / 1e9,
               "sgd_step_GBps": 5 * 4 * elements / sgd_s / 1e9}
    figures["perturb_of_copy"] = figures["perturb_GBps"] / figures["copy_GBps"]
    figures["sgd_step_of_copy"] = figures["sgd_step_GBps"] / figures["copy_GBps"]
    detail = (f"copy {figures['copy_GBps']:.0f} GB/s; perturb {figures['perturb_GBps']:.0f} GB/s "
              f"({figures['perturb_of_copy']:.0%}); SGD descent {figures['sgd_step_GBps']:.0f} GB/s "
              f"({figures['sgd_step_of_copy']:.0%})")
    return Result(f"bandwidth {backend} {device.type}", True, detail, figures)


def check_host_cost(backend: str, device: torch.device) -> Result:
    """Host time of first_step + second_step over 161 small parameters (ResNet-50's count)."""
    from .optim import SAM

    params = [torch.zeros(64, device=device, requires_grad=True) for _ in range(161)]
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    sam = SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)

    def iteration():
        sam.first_step()
        sam.second_step()

    iteration()
    seconds = _time(iteration, device, repeats=30)
    return Result(f"host cost {backend} {device.type}", True, f"{seconds * 1e6:.0f} us per SAM iteration "
                  "(161 parameters)", {"host_us": seconds * 1e6})


def plan(quick: bool) -> list[tuple[str, Callable[[], Result] | None, str]]:
    """(name, check or None, why skipped) for this machine."""
    checks = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        present = []
        for backend in ("native", "triton"):
            usable, why = (backends.native_status if backend == "native" else backends.triton_status)(
                device.type)
            if not usable:
                checks.append((f"{backend} {device.type}", None, why))
                continue
            present.append(backend)
            counts = (1, 30) if quick else (1, 300) if _interpreted(backend, device) else (1, 300, 3000)
            for count in counts:
                for dtype in DTYPES:
                    checks.append((f"ops {backend} {device.type} {count} tensors {dtype}",
                                   lambda b=backend, d=device, c=count, t=dtype: check_ops(b, d, c, t), ""))
            if device.type == "cuda":
                checks.append((f"large tensor {backend}",
                               lambda b=backend, d=device: check_large_tensor(b, d), ""))
                checks.append((f"CUDA graph SAM step {backend}",
                               lambda b=backend, d=device: check_cuda_graph(b, d), ""))
                checks.append((f"bandwidth {backend}",
                               lambda b=backend, d=device: check_bandwidth(b, d, 2**26), ""))
            if _interpreted(backend, device):
                checks.append((f"host cost {backend} {device.type}", None,
                               "the Triton interpreter's host time says nothing about a GPU's"))
            else:
                checks.append((f"host cost {backend} {device.type}",
                               lambda b=backend, d=device: check_host_cost(b, d), ""))
        if present:
            checks.append((f"masks {device.type}", lambda d=device, p=present: check_masks(d, p), ""))
    if not torch.cuda.is_available():
        checks.append(("GPU checks (ops on CUDA, large tensor, CUDA graph, bandwidth)", None,
                       "no CUDA device"))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the record to this file")
    parser.add_argument("--quick", action="store_true", help="fewer tensor counts (a smoke run)")
    args = parser.parse_args(argv)
    results = []
    began = time.perf_counter()
    for name, check, why in plan(args.quick):
        if check is None:
            result = Result(name, None, why)
        else:
            try:
                result = check()
            except Exception as error:  # a check that crashes is a failure, reported like the others
                result = Result(name, False, f"{type(error).__name__}: {error}")
        results.append(result)
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[result.passed]
        print(f"{status} {result.name}" + (f": {result.detail}" if result.detail else ""), flush=True)
    failed = sum(r.passed is False for r in results)
    record = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "seconds": time.perf_counter() - began,
              "passed": sum(r.passed is True for r in results), "failed": failed,
              "skipped": sum(r.passed is None for r in results), "results": [asdict(r) for r in results]}
    text = json.dumps(record, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
