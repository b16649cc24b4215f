"""Optimizer-side cost of one SAM iteration: eager implementations against the fused sam_kernels ops.

One iteration's optimizer work is everything SAM adds around the two backward passes plus the base step:
global gradient norm, backup and perturbation, restore and the base optimizer's step (SGD with momentum
0.9 and weight decay 5e-4). The gradients already in ``.grad`` stand in for both passes' gradients, so
every SAM variant ends an iteration with the same weights, which python_tests/test_benchmarks.py verifies.

Bytes-moved model per parameter (b = bytes per element): base SGD step reads w, g, buf and writes w, buf:
5b. SAM: norm reads g (1b), perturb reads w, g and writes backup, w (4b), restore-and-step reads backup,
g, buf and writes w, buf (5b): 10b, so 2.0x the base step is the floor. SSAM adds the second norm (1b).
ESAM with keep fraction beta: beta * 5b for norm and perturb, 5b for the restore-and-step.

    python -m benchmarks.optimizer_step [--sets resnet50 vit_b16] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import eager
from benchmarks.launches import count_launches
from benchmarks.shapes import PARAM_SETS, numel
from sam_kernels import backends
from sam_kernels.optim import ESAM, SAM

RHO, LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.1, 0.9, 5e-4
ESAM_BETA = 0.6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -------------------------------------------------------------------------------------- the variants


class Variant:
    """One way of doing an iteration's optimizer work; ``step()`` runs one iteration in place."""

    bytes_per_element = 10  # SAM's model; subclasses override

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params

    def step(self) -> None:
        raise NotImplementedError


class FusedBaseSGD(Variant):
    """torch.optim.SGD(fused=True): the base optimizer's step alone, the floor everything is compared to
    (``foreach=True``: torch's multi-tensor foreach step instead)."""

    bytes_per_element = 5

    def __init__(self, params, foreach: bool = False):
        super().__init__(params)
        self.optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                         fused=not foreach, foreach=foreach)

    def step(self):
        self.optimizer.step()


class EagerSAM(Variant):
    """SAM as the popular per-tensor implementation writes it (``benchmarks.eager.EagerSAM``): a Python
    loop, ~5 ATen ops per tensor (``foreach=True``: the base step is torch's foreach SGD)."""

    def __init__(self, params, foreach: bool | None = None):
        super().__init__(params)
        self.optimizer = eager.EagerSAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                                        weight_decay=WEIGHT_DECAY, foreach=foreach)

    def step(self):
        self.optimizer.first_step()
        self.optimizer.second_step()


class EagerESAM(Variant):
    """ESAM's optimizer side as the official code writes it (``benchmarks.eager.EagerESAM``): per-tensor
    SWP, subtract-to-restore."""

    bytes_per_element = 5 + 5 * ESAM_BETA

    def __init__(self, params, beta=ESAM_BETA, seed=0):
        super().__init__(params)
        self.optimizer = eager.EagerESAM(params, torch.optim.SGD, rho=RHO, beta=beta, seed=seed, lr=LR,
                                         momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(self):
        self.optimizer.drop_tensors()
        self.optimizer.first_step()
        self.optimizer.keep_all_tensors()
        self.optimizer.second_step()


class ForeachSAM(Variant):
    """SAM with torch's own multi-tensor foreach ops and SGD(foreach=True): the best one can do in torch."""

    def __init__(self, params):
        super().__init__(params)
        self.base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                    foreach=True)
        self.backups = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        grads = [p.grad for p in self.params]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_copy_(self.backups, self.params)
        torch._foreach_add_(self.params, torch._foreach_mul(grads, RHO / (grad_norm + 1e-12)))
        torch._foreach_copy_(self.params, self.backups)
        self.base.step()


@dataclass
class FusedSAM(Variant):
    """sam_kernels' optimizer classes, first_step() + second_step(): norm, perturb with backup, restore
    fused with the SGD step; one backend. ``renormalize``: SSAM; ``keep < 1``: ESAM's per-tensor SWP
    with beta = keep (two-call loop, gamma 1)."""

    params: list
    backend: str
    renormalize: bool = False
    keep: float = 1.0  # ESAM's per-tensor keep probability
    seed: int = 0
    bytes_per_element: float = 10

    def __post_init__(self):
        options = {"rho": RHO, "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                   "backend": self.backend, "seed": self.seed}
        if self.keep < 1:
            self.optimizer = ESAM(self.params, torch.optim.SGD, beta=self.keep, gamma=1.0, **options)
            self.bytes_per_element = 5 + 5 * self.keep
        else:
            self.optimizer = SAM(self.params, torch.optim.SGD, renormalize=self.renormalize, **options)
            if self.renormalize:
                self.bytes_per_element = 11

    def step(self):
        self.optimizer.first_step()
        self.optimizer.second_step()


class GraphedSAM(Variant):
    """A SAM iteration's optimizer calls (``first_step()`` + ``second_step()``, ``capturable=True``)
    captured once in a CUDA graph and replayed: one host call per iteration (CUDA only). Construction runs
    ``WARMUP`` iterations on a side stream first, as graph capture requires (state and workspace are
    allocated there), so the parameters have taken ``WARMUP`` steps before the first replay."""

    WARMUP = 3

    def __init__(self, params, backend: str):
        super().__init__(params)
        self.optimizer = SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                             weight_decay=WEIGHT_DECAY, backend=backend, capturable=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.iteration()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.iteration()

    def iteration(self):
        self.optimizer.first_step()
        self.optimizer.second_step()

    def step(self):
        self.graph.replay()


def available_backends(device: torch.device) -> list[str]:
    """The sam_kernels backends that run on ``device`` at full speed: not the Triton interpreter, and
    the torch reference (written for reading) only where no kernel backend is available."""
    names = []
    for name in backends.BACKEND_NAMES:
        if name == "triton" and device.type != "cuda":
            continue
        try:
            backends.resolve(device, name)
        except (RuntimeError, ValueError):
            continue
        names.append(name)
    kernels = [name for name in names if name != "torch"]
    return kernels or names


def make_variants(params_factory, device) -> dict[str, callable]:
    """Name -> constructor of a variant over a fresh copy of the parameters."""
    variants = {
        "sgd fused (base only)": lambda: FusedBaseSGD(params_factory()),
        "eager SAM": lambda: EagerSAM(params_factory()),
        "eager ESAM": lambda: EagerESAM(params_factory()),
        "foreach SAM": lambda: ForeachSAM(params_factory()),
    }
    for name in available_backends(device):
        variants[f"sam_kernels SAM [{name}]"] = lambda n=name: FusedSAM(params_factory(), n)
        variants[f"sam_kernels SSAM [{name}]"] = lambda n=name: FusedSAM(params_factory(), n,
                                                                          renormalize=True)
        variants[f"sam_kernels ESAM [{name}]"] = lambda n=name: FusedSAM(params_factory(), n,
                                                                          keep=ESAM_BETA)
    if device.type == "cuda":
        first = available_backends(device)[0]
        variants[f"sam_kernels SAM [{first}, CUDA graph]"] = lambda: GraphedSAM(params_factory(), first)
    return variants


# --------------------------------------------------------------------------------------- measurement


def make_params(shapes, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype))
        p.grad = (torch.randn(shape, generator=generator) * 1e-2).to(device, dtype)
        params.append(p)
    return params


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Wall time of one call in seconds (CUDA work is waited for before the clock stops)."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_times(fns: dict, device, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """``repeats`` times of each function, one of each per round.

    NOTE (interleaving): machine noise (other jobs on a shared CPU, clock changes) then hits every
    variant alike instead of whichever happened to run during a slow spell."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def median_time(fn, device, repeats, warmup=2) -> float:
    """Median wall time of ``fn`` in seconds."""
    return statistics.median(interleaved_times({"fn": fn}, device, repeats, warmup)["fn"])


def copy_bandwidth(device, dtype=torch.float32, elements=32 * 2**20, rounds=5) -> dict[str, float]:
    """Measured memory bandwidth in bytes per second: the best of ``rounds`` rounds of two STREAM-style
    kernels, an in-place add (``a += b``) and a triad (``a = b + 0.5 c``), each two reads and a write,
    and ``reference``, the higher of the two (the figure "of bw" divides by).

    NOTE: best rather than median, since noise only ever slows a run down; an in-place update is how every
    SAM op writes, and the triad adds a third buffer (a CPU pays a read-for-ownership of it, which the
    bytes-moved models do not count).
    """
    a = torch.randn(elements, device=device).to(dtype)
    b, c = torch.randn_like(a), torch.randn_like(a)
    bytes_moved = 3 * a.numel() * a.element_size()
    times = interleaved_times({"add": lambda: a.add_(b), "triad": lambda: torch.add(b, c, alpha=0.5, out=a)},
                              device, rounds)
    result = {name: bytes_moved / min(seconds) for name, seconds in times.items()}
    result["reference"] = max(result.values())
    return result


def peak_extra_memory(variant: Variant, device) -> int | None:
    """Bytes a CUDA iteration needs beyond the parameters, gradients and persistent state (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    variant.step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class Row:
    param_set: str
    dtype: str
    variant: str
    tensors: int
    parameters: int
    median_ms: float
    min_ms: float = 0.0
    max_ms: float = 0.0
    vs_eager_sam: float = 0.0
    vs_fused_sgd: float = 0.0
    #: min and max over the rounds of the per-round ratios (each round times every variant once)
    vs_eager_sam_range: tuple[float, float] = (0.0, 0.0)
    vs_fused_sgd_range: tuple[float, float] = (0.0, 0.0)
    gbytes_per_s: float = 0.0
    of_copy_bandwidth: float = 0.0
    ops_per_iteration: int = 0
    peak_extra_mb: float | None = None


def run(param_sets, dtype_names, device, repeats) -> tuple[list[Row], dict[str, float]]:
    bandwidths = copy_bandwidth(device)
    bandwidth = bandwidths["reference"]
    rows = []
    for set_name in param_sets:
        shapes = PARAM_SETS[set_name]()
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            template = make_params(shapes, dtype, device)

            def fresh(template=template):
                params = [torch.nn.Parameter(p.detach().clone()) for p in template]
                for p, t in zip(params, template):
                    p.grad = t.grad.clone()
                return params

            set_rows = []
            built = {name: build() for name, build in make_variants(fresh, device).items()}
            times = interleaved_times({name: v.step for name, v in built.items()}, device, repeats)
            for name, variant in built.items():
                seconds = statistics.median(times[name])
                bytes_moved = variant.bytes_per_element * numel(shapes) * torch.finfo(dtype).bits / 8
                peak = peak_extra_memory(variant, device)
                set_rows.append(Row(
                    set_name, dtype_name, name, len(shapes), numel(shapes), seconds * 1e3,
                    min_ms=min(times[name]) * 1e3, max_ms=max(times[name]) * 1e3,
                    gbytes_per_s=bytes_moved / seconds / 1e9,
                    of_copy_bandwidth=bytes_moved / seconds / bandwidth,
                    ops_per_iteration=count_launches(variant.step),
                    peak_extra_mb=None if peak is None else peak / 2**20))
            del built
            base = next(name for name in times if name.startswith("sgd fused"))
            for row in set_rows:
                row.vs_eager_sam, row.vs_eager_sam_range = round_ratios(times[row.variant],
                                                                        times["eager SAM"])
                row.vs_fused_sgd, row.vs_fused_sgd_range = round_ratios(times[row.variant], times[base])
            rows += set_rows
            print(format_table(set_rows), flush=True)
    return rows, bandwidths


def round_ratios(times: list[float], reference: list[float]) -> tuple[float, tuple[float, float]]:
    """Median and (min, max) of the per-round ratios ``times[i] / reference[i]``.

    NOTE (ratios per round): the variants of a round run back to back, so a slow spell of a shared
    machine slows both sides of a round's ratio alike; the ratio of two medians taken over different
    spells does not cancel it."""
    ratios = [a / b for a, b in zip(times, reference, strict=True)]
    return statistics.median(ratios), (min(ratios), max(ratios))


def summary_lines(rows: list[Row]) -> list[str]:
    """One line per parameter set and dtype: each sam_kernels SAM row's ratio to the fused SGD step and to
    eager SAM, median over the rounds with the min-max."""
    lines = []
    for r in rows:
        if r.variant.startswith("sam_kernels SAM"):
            lo, hi = r.vs_fused_sgd_range
            elo, ehi = r.vs_eager_sam_range
            lines.append(f"optimizer step, {r.param_set} {r.dtype}: {r.variant} {r.vs_fused_sgd:.2f}x fused "
                         f"SGD ({lo:.2f}-{hi:.2f}), {r.vs_eager_sam:.2f}x eager SAM ({elo:.2f}-{ehi:.2f})")
    return lines


def format_table(rows: list[Row]) -> str:
    head = rows[0]
    width = max(28, *(len(r.variant) for r in rows))
    lines = [f"\n{head.param_set} ({head.tensors} tensors, {head.parameters / 1e6:.1f}M parameters, "
             f"{head.dtype})",
             f"{'variant':<{width}} {'median ms':>10} {'min-max ms':>15} {'/eager SAM':>11} "
             f"{'/fused SGD':>11} {'GB/s':>8} {'of bw':>8} {'ops/iter':>9} {'peak MB':>8}"]
    for r in rows:
        peak = "n/a" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.0f}"
        spread = f"{r.min_ms:.2f}-{r.max_ms:.2f}"
        flag = "!" if r.of_copy_bandwidth > 1 else " "
        lines.append(f"{r.variant:<{width}} {r.median_ms:>10.2f} {spread:>15} {r.vs_eager_sam:>10.2f}x "
                     f"{r.vs_fused_sgd:>10.2f}x {r.gbytes_per_s:>8.1f} {r.of_copy_bandwidth:>6.0%}{flag} "
                     f"{r.ops_per_iteration:>9} {peak:>8}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["resnet50", "vit_b16", "many_small", "few_large"],
                        choices=sorted(PARAM_SETS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on the CPU (default: torch's; "
                        "use 1 when other work shares the cores: an oversubscribed thread pool can run "
                        "100x slower)")
    parser.add_argument("--summary", type=Path, help="append the summary lines to this file too")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, bandwidths = run(args.sets, args.dtypes, device, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"device": device_name(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "copy_bandwidth_gb_s": bandwidths["reference"] / 1e9,
              "bandwidths_gb_s": {name: value / 1e9 for name, value in bandwidths.items()},
              "rows": [asdict(r) for r in rows]}
    path = args.out / f"optimizer_step_{device.type}.json"
    path.write_text(json.dumps(record, indent=2))
    over = [f"{r.param_set}/{r.dtype}/{r.variant}" for r in rows if r.of_copy_bandwidth > 1]
    print(f"\nmemory bandwidth, best of 5: in-place add {bandwidths['add'] / 1e9:.1f} GB/s, triad "
          f"{bandwidths['triad'] / 1e9:.1f} GB/s (\"of bw\" divides by the higher) on {record['device']}; "
          f"results in {path}")
    if over:
        print(f"NOTE: above the measured bandwidth (marked !, the reference ran in a slow spell or the "
              f"data sat in cache): {', '.join(over)}")
    write_summary(summary_lines(rows), args.summary)


def write_summary(lines: list[str], path: Path | None) -> None:
    """Print the summary lines, and append them to ``path`` when given (scripts/bench.sh collects the
    lines of its runs there and prints them last)."""
    print("\n" + "\n".join(lines))
    if path is not None:
        with path.open("a") as f:
            f.write("\n".join(lines) + "\n")


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
