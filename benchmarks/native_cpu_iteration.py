"""One SAM iteration's optimizer work on the CPU: the native C++ backend's ops against torch's own optimizers.

On a parameter set of ``benchmarks.shapes`` (default ResNet-50's 161 shapes, 25.6M fp32 parameters),
with the hyper-parameters and the gradients of ``benchmarks.optimizer_step`` (the gradient in ``.grad``
stands in for both passes'):

* ``native``: sam_kernels' op layer on the native CPU backend, grad_norm + perturb_ (with backup) +
  restore_sgd_step_ (SGD, momentum 0.9, weight decay): the whole optimizer side of a SAM iteration;
* ``native ops``: the same three kernels through ``torch.ops.sam_kernels`` directly, without the op
  layer's Python validation (its cost is the difference);
* ``fused SGD``: ``optimizer_step.FusedBaseSGD``, one ``torch.optim.SGD(fused=True)`` step, the floor a
  base optimizer sets;
* ``eager SAM``: ``optimizer_step.EagerSAM`` (the popular per-tensor SAM of ``benchmarks.eager``) with
  ``torch.optim.SGD(foreach=True)``'s step.

Each is timed ``--repeats`` times, interleaved, after warm-up; the medians and their ratios are printed.
The optimizer classes on every backend are timed by ``benchmarks.optimizer_step``.

    python -m benchmarks.native_cpu_iteration [--set resnet50] [--repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import optimizer_step
from benchmarks.optimizer_step import LR, MOMENTUM, RHO, WEIGHT_DECAY, Variant
from benchmarks.shapes import PARAM_SETS, numel
from sam_kernels import ops
from sam_kernels.backends import native_backend

EPS = 1e-12


class NativeOps(Variant):
    """sam_kernels' ops on the native CPU backend, on plain tensors (the parameters' data)."""

    def __init__(self, params):
        super().__init__(params)
        self.weights = [p.detach() for p in params]
        self.grads = [p.grad for p in params]
        self.backups = [torch.empty_like(w) for w in self.weights]
        self.buffers = [None] * len(params)

    def step(self):
        norm, _ = ops.grad_norm(self.weights, self.grads, backend="native")
        ops.perturb_(self.weights, self.backups, norm, grads=self.grads, rho=RHO, eps=EPS, backend="native")
        self.buffers = ops.restore_sgd_step_(self.weights, self.backups, self.buffers, grads=self.grads,
                                             lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                             backend="native")


class NativeOpsDirect(NativeOps):
    """The same kernels called through torch.ops.sam_kernels directly: no op-layer validation."""

    def __init__(self, params):
        super().__init__(params)
        self.buffers = [torch.zeros_like(w) for w in self.weights]
        self.indices = list(range(len(params)))
        self.first_step = [0] * len(params)
        self.steps = torch.tensor(0, dtype=torch.int64)

    def step(self):
        kernels = torch.ops.sam_kernels
        norm, _ = kernels.grad_norm(self.grads, [], 0.0)
        kernels.perturb_(self.weights, self.grads, self.backups, self.indices, norm, self.steps, RHO, EPS,
                         1 << 24, 1.0, True, False, 0.0, 0, 0)
        kernels.restore_sgd_step_(self.weights, self.backups, self.grads, self.buffers, self.first_step, LR,
                                  MOMENTUM, 0.0, WEIGHT_DECAY, False, False, None, None)


VARIANTS = {
    "native": NativeOps,
    "native ops": NativeOpsDirect,
    "fused SGD": optimizer_step.FusedBaseSGD,
    "eager SAM": lambda params: optimizer_step.EagerSAM(params, foreach=True),
}


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
    device = torch.device("cpu")
    runs = {name: make(optimizer_step.make_params(shapes, torch.float32, device))
            for name, make in VARIANTS.items()}
    for run in runs.values():
        for _ in range(args.warmup):
            run.step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():  # NOTE (drift): interleaved, so load drift hits every variant alike
            start = time.perf_counter()
            run.step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.set} parameter shapes: {len(shapes)} tensors, {numel(shapes) / 1e6:.1f}M fp32 parameters; "
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
