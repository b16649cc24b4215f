"""One SAM iteration's optimizer work on the CPU, op by op: the native C++ kernels against torch's fused SGD.

On a parameter set of ``benchmarks.shapes`` (default ResNet-50's 161 shapes, 25.6M fp32 parameters), with
the hyper-parameters and gradients of ``benchmarks.optimizer_step``, each of the native backend's ops of a
SAM iteration is timed alone, called through ``torch.ops.sam_kernels`` (no Python above the op):

* ``grad norm``: ``grad_norm`` over the gradients (the ascent's norm; the descent's non-finite check is
  the same pass over the second gradients);
* ``perturb + backup``: ``perturb_`` writing the backup and the perturbed weights;
* ``restore + SGD step``: ``restore_sgd_step_``, the weights from the backup and one SGD step (momentum
  0.9, weight decay 5e-4);
* ``SAM iteration``: the four calls of an iteration in the optimizer's order (norm, perturb, norm,
  restore and step);
* ``fused SGD``: one ``torch.optim.SGD(fused=True)`` step, the floor a base optimizer sets;
* ``eager SAM``: the popular per-tensor SAM (``optimizer_step.EagerSAM``) with torch's foreach SGD.

Every variant runs once per round, interleaved, after warm-up; the medians (min-max) are printed with
each op's memory streams per parameter (a stream is one pass over a tensor of the set's size) and the
rates they imply. A store to a line the op did not read first is a read for ownership, counted as a read,
except for the backup above 16 MiB per call, which the kernel writes with non-temporal stores (NOTE
(streamed backup), csrc/cpu/ops_cpu.cpp). ``benchmarks.optimizer_step`` times the optimizer classes.

    python -m benchmarks.native_cpu_iteration [--set resnet50] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks import optimizer_step
from benchmarks.optimizer_step import LR, MOMENTUM, RHO, WEIGHT_DECAY
from benchmarks.shapes import PARAM_SETS, numel
from sam_kernels.backends import native_backend
from sam_kernels.backends.common import SgdConfig

EPS = 1e-12
KEEP_ALL = 1 << 24  # perturb_'s keep threshold without a mask
STREAMED_BACKUP_BYTES = 16 << 20  # kStreamedBytes in csrc/cpu/ops_cpu.cpp


@dataclass(frozen=True)
class Streams:
    """Memory streams per parameter: passes reading (reads for ownership included) and writing."""

    reads: float
    writes: float


class NativeOps:
    """The native kernels of one SAM iteration on plain tensors, each op callable on its own."""

    def __init__(self, params):
        self.weights = [p.detach() for p in params]
        self.grads = [p.grad for p in params]
        self.backups = [torch.empty_like(w) for w in self.weights]
        self.buffers = [torch.zeros_like(w) for w in self.weights]
        self.indices = list(range(len(params)))
        self.first_step = [0] * len(params)
        self.step_counter = torch.tensor(0, dtype=torch.int64)
        self.config = SgdConfig(LR, MOMENTUM, 0.0, WEIGHT_DECAY).values()
        self.kernels = torch.ops.sam_kernels
        self.norm = self.grad_norm()

    def grad_norm(self):
        return self.kernels.grad_norm(self.grads, [], 0.0)[0]

    def perturb(self):
        self.kernels.perturb_(self.weights, self.grads, self.backups, self.indices, self.norm,
                              self.step_counter, RHO, EPS, KEEP_ALL, 1.0, True, False, 0.0, 0, 0)

    def descent(self):
        self.kernels.restore_sgd_step_(self.weights, self.backups, self.grads, self.buffers, self.first_step,
                                       self.config, None, None)

    def iteration(self):
        self.norm = self.grad_norm()
        self.perturb()
        self.grad_norm()  # the descent's non-finite check
        self.descent()


def variants(shapes, backup_streamed: bool) -> dict[str, tuple]:
    """name -> (step callable, Streams or None)."""
    device = torch.device("cpu")
    native = NativeOps(optimizer_step.make_params(shapes, torch.float32, device))
    fused = optimizer_step.FusedBaseSGD(optimizer_step.make_params(shapes, torch.float32, device))
    eager = optimizer_step.EagerSAM(optimizer_step.make_params(shapes, torch.float32, device), foreach=True)
    perturb = Streams(2, 2) if backup_streamed else Streams(3, 2)  # w, g (and the backup's lines)
    return {
        "grad norm": (native.grad_norm, Streams(1, 0)),
        "perturb + backup": (native.perturb, perturb),
        "restore + SGD step": (native.descent, Streams(4, 2)),  # backup, g, momentum, w's lines; w, momentum
        "SAM iteration": (native.iteration, Streams(6 + perturb.reads, 2 + perturb.writes)),
        "fused SGD": (fused.step, Streams(3, 2)),  # w, g, momentum in place
        "eager SAM": (eager.step, None),
    }


def print_rate_model(runs, median, stream_bytes) -> None:
    """NOTE (rate model): one core reads at most R bytes/s and writes at most W bytes/s, so an op takes
    max(reads / R, writes / W). R is the read-only norm's rate, W the write rate of torch's fused SGD step
    (which the model takes as write-bound); the model then predicts the other ops, and the floor of an
    iteration whose descent writes w without reading it first (no read for ownership)."""
    read_rate = runs["grad norm"][1].reads * stream_bytes / median["grad norm"]
    write_rate = runs["fused SGD"][1].writes * stream_bytes / median["fused SGD"]

    def predicted(streams: Streams) -> float:
        return max(streams.reads * stream_bytes / read_rate, streams.writes * stream_bytes / write_rate)

    sgd = median["fused SGD"]
    norm, perturb, descent = (runs[op][1] for op in ("grad norm", "perturb + backup", "restore + SGD step"))
    estimates = {name: predicted(runs[name][1]) for name in ("perturb + backup", "restore + SGD step")}
    estimates["SAM iteration"] = 2 * predicted(norm) + predicted(perturb) + predicted(descent)
    estimates["fused SGD"] = predicted(runs["fused SGD"][1])
    print(f"rate model: reads {read_rate / 1e9:.1f} GB/s (the norm), writes {write_rate / 1e9:.1f} GB/s "
          f"(fused SGD); predicted / fused SGD:")
    for name, estimate in estimates.items():
        print(f"  {name:<20} predicted {estimate / sgd:.2f}x, measured {median[name] / sgd:.2f}x")
    floor = 2 * predicted(norm) + predicted(perturb) + predicted(Streams(descent.reads - 1, descent.writes))
    print(f"  an iteration with no read for ownership in the descent: {floor / sgd:.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="resnet50", choices=sorted(PARAM_SETS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if not native_backend.is_built():
        raise SystemExit(f"the native backend is unavailable: {native_backend.build_info()['error']}; "
                         f"{native_backend.BUILD_HINT}")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = PARAM_SETS[args.set]()
    stream_bytes = numel(shapes) * 4
    runs = variants(shapes, backup_streamed=stream_bytes >= STREAMED_BACKUP_BYTES)
    for step, _ in runs.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (step, _) in runs.items():  # NOTE (drift): interleaved, so load drift hits every variant
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    sgd = median["fused SGD"]
    print(f"{args.set} parameter shapes: {len(shapes)} tensors, {numel(shapes) / 1e6:.1f}M fp32 parameters "
          f"({stream_bytes / 2**20:.0f} MiB a stream); torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; median (min-max) of {args.repeats} rounds after {args.warmup} warm-up")
    print(f"native extension: {native_backend.describe()}")
    header = ("ms", "/ fused SGD", "streams r+w", "read GB/s", "total GB/s")
    print(f"  {'':<20} {header[0]:>24} {header[1]:>11} {header[2]:>12} {header[3]:>10} {header[4]:>11}")
    for name, value in median.items():
        spread = f"{value * 1e3:.2f} ({min(times[name]) * 1e3:.2f}-{max(times[name]) * 1e3:.2f})"
        streams = runs[name][1]
        rates = ""
        if streams is not None:
            read_rate = streams.reads * stream_bytes / value / 1e9
            total_rate = (streams.reads + streams.writes) * stream_bytes / value / 1e9
            rates = f"{f'{streams.reads:g}+{streams.writes:g}':>12} {read_rate:>10.1f} {total_rate:>11.1f}"
        print(f"  {name:<20} {spread:>24} {value / sgd:>10.2f}x {rates}")
    print_rate_model(runs, median, stream_bytes)
    ops_sum = 2 * median["grad norm"] + median["perturb + backup"] + median["restore + SGD step"]
    print(f"the four ops timed alone, summed: {ops_sum / sgd:.2f}x fused SGD; as one iteration: "
          f"{median['SAM iteration'] / sgd:.2f}x; eager SAM / native SAM iteration: "
          f"{median['eager SAM'] / median['SAM iteration']:.2f}x")


if __name__ == "__main__":
    main()
