"""One SAM iteration's optimizer work on the CPU: the native C++ backend against torch's own optimizers.

On ResNet-50's 161 parameter shapes (25.6M fp32 parameters), from one run:

* ``native``: sam_kernels' native CPU backend, grad_norm + perturb_ (with backup) + restore_sgd_step_
  (SGD, momentum 0.9): the whole optimizer side of a SAM iteration;
* ``native ops``: the same three kernels through ``torch.ops.sam_kernels`` directly, without the op
  layer's Python validation (its cost is the difference);
* ``fused SGD``: one ``torch.optim.SGD(fused=True, momentum=0.9)`` step, the floor a base optimizer sets;
* ``eager SAM``: the usual per-tensor SAM: the norm of per-tensor norms, a backup copy, the perturbation
  ``add_``, the restore ``copy_``, then ``torch.optim.SGD(foreach=True, momentum=0.9)``'s step.

Each is timed ``--repeats`` times, interleaved, after warm-up; the medians and their ratios are printed.

    python -m benchmarks.native_cpu_iteration [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from benchmarks.shapes import resnet50_shapes
from sam_kernels import ops
from sam_kernels.backends import native_backend

RHO, LR, MOMENTUM, EPS = 0.05, 0.01, 0.9, 1e-12


def make(shapes, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator) * scale for s in shapes]


class NativeSam:
    """sam_kernels' ops on the native CPU backend."""

    def __init__(self, shapes):
        self.params = make(shapes, 0)
        self.first, self.second = make(shapes, 1, 1e-3), make(shapes, 2, 1e-3)
        self.backups = [torch.empty_like(p) for p in self.params]
        self.buffers = [None] * len(shapes)

    def __call__(self):
        norm, _ = ops.grad_norm(self.params, self.first, backend="native")
        ops.perturb_(self.params, self.backups, norm, grads=self.first, rho=RHO, eps=EPS, backend="native")
        self.buffers = ops.restore_sgd_step_(self.params, self.backups, self.buffers, grads=self.second,
                                             lr=LR, momentum=MOMENTUM, backend="native")


class NativeSamDirect(NativeSam):
    """The same kernels called through torch.ops.sam_kernels directly: no op-layer validation."""

    def __init__(self, shapes):
        super().__init__(shapes)
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.indices = list(range(len(shapes)))
        self.first_step = [0] * len(shapes)
        self.step = torch.tensor(0, dtype=torch.int64)

    def __call__(self):
        kernels = torch.ops.sam_kernels
        norm, _ = kernels.grad_norm(self.first, [], 0.0)
        kernels.perturb_(self.params, self.first, self.backups, self.indices, norm, self.step, RHO, EPS,
                         1 << 24, 1.0, True, False, 0.0, 0, 0)
        kernels.restore_sgd_step_(self.params, self.backups, self.second, self.buffers, self.first_step, LR,
                                  MOMENTUM, 0.0, 0.0, False, False, None, None)


class FusedSgd:
    """torch.optim.SGD(fused=True)'s step alone."""

    def __init__(self, shapes):
        self.params = [torch.nn.Parameter(p) for p in make(shapes, 0)]
        for p, g in zip(self.params, make(shapes, 2, 1e-3)):
            p.grad = g
        self.optimizer = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM, fused=True)

    def __call__(self):
        self.optimizer.step()


class EagerSam:
    """Per-tensor eager SAM: what popular SAM implementations do, with torch's foreach SGD step."""

    def __init__(self, shapes):
        self.params = [torch.nn.Parameter(p) for p in make(shapes, 0)]
        self.first, self.second = make(shapes, 1, 1e-3), make(shapes, 2, 1e-3)
        self.backups = [torch.empty_like(p) for p in self.params]
        self.optimizer = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM, foreach=True)

    @torch.no_grad()
    def __call__(self):
        norm = torch.norm(torch.stack([g.norm(p=2) for g in self.first]), p=2)
        scale = RHO / (norm + EPS)
        for p, g, backup in zip(self.params, self.first, self.backups):
            backup.copy_(p)
            p.add_(g * scale)
        for p, backup, g in zip(self.params, self.backups, self.second):
            p.copy_(backup)
            p.grad = g
        self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if not native_backend.is_built():
        raise SystemExit(f"the native backend is unavailable: {native_backend.build_info()['error']}; "
                         f"{native_backend.BUILD_HINT}")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = resnet50_shapes()
    n = sum(math.prod(s) for s in shapes)
    runs = {"native": NativeSam(shapes), "native ops": NativeSamDirect(shapes), "fused SGD": FusedSgd(shapes),
            "eager SAM": EagerSam(shapes)}
    for run in runs.values():
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():  # interleaved, so drift hits every variant alike
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"ResNet-50 parameter shapes: {len(shapes)} tensors, {n / 1e6:.1f}M fp32 parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"native extension: {native_backend.describe()}")
    for name, value in median.items():
        spread = f"min {min(times[name]) * 1e3:.2f} / max {max(times[name]) * 1e3:.2f}"
        print(f"  {name:<11} {value * 1e3:8.2f} ms  ({spread} ms)")
    print(f"native SAM optimizer work / fused SGD step: {median['native'] / median['fused SGD']:.2f}x")
    print(f"eager SAM / native SAM:                     {median['eager SAM'] / median['native']:.2f}x")


if __name__ == "__main__":
    main()
