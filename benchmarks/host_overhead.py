"""Host cost of one SAM iteration's optimizer calls, on parameters so small that the kernels do no work.

With one-element parameters the time of an optimizer step is its Python and dispatch overhead: on a GPU,
where kernel launches are asynchronous, that host time is what the optimizer side costs for most models.
Variants, each an iteration's optimizer work with the gradients already in place:

* ``sam_kernels SAM/SSAM/ESAM [backend]``: the optimizer classes, ``first_step()`` + ``second_step()``
  over SGD with momentum and weight decay (ESAM: per-tensor SWP, beta 0.6, two-call loop with gamma 1);
* ``sgd fused`` / ``sgd foreach``: one ``torch.optim.SGD`` step, the base optimizer alone;
* ``eager SAM`` and ``foreach SAM``: the per-tensor and the foreach SAM;
* on the first backend only, what the other calling styles add: ``SAM step(closure)`` (torch's closure
  convention, the closure setting the same gradients again, as zero_grad and backward would), ``the
  closure alone, twice`` (its own work, to subtract), and ``SAM Interval(2)`` (a schedule: every other
  step plain); on a GPU also ``SAM [backend, CUDA graph]``, the iteration captured once and replayed.
The variants are those of ``benchmarks.optimizer_step`` and the ones above.

Every variant is called ``--repeats`` times per round, the variants taking turns call by call, over
``--rounds`` rounds; the median over all calls is reported with its interquartile range. Each ratio to
the fused SGD step (measured in the same run) is the median over the rounds of the ratio of the two
round medians, with its min-max. On a GPU the host time is the wall time of a call with no synchronize;
the device time per call, from a batch of calls queued back to back and then a synchronize, is
reported apart.

    python -m benchmarks.host_overhead [--counts 161 2000] [--rounds 5] [--repeats 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import optimizer_step
from sam_kernels import SAM
from sam_kernels.optim import Interval


def make_params(count: int, device) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(1, device=device)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(1, device=device) * 1e-3
    return params


class ClosureSAM:
    """``SAM.step(closure)`` in torch's convention; the closure sets the gradients found at
    construction again (what ``zero_grad()`` and ``backward()`` would leave)."""

    def __init__(self, params, backend: str, run_optimizer: bool = True) -> None:
        self.optimizer = optimizer_step.FusedSAM(params, backend).optimizer
        self.pairs = [(p, p.grad) for p in params]
        self.run_optimizer = run_optimizer

    def closure(self) -> float:
        for param, grad in self.pairs:
            param.grad = grad
        return 0.0

    def step(self) -> None:
        if self.run_optimizer:
            self.optimizer.step(self.closure)
        else:  # the closure's own work in one step(closure): two calls
            self.closure()
            self.closure()


class IntervalSAM:
    """The two-call iteration under ``schedule=Interval(2)``: every other step plain (no perturbation)."""

    def __init__(self, params, backend: str) -> None:
        self.optimizer = SAM(params, torch.optim.SGD, rho=optimizer_step.RHO, lr=optimizer_step.LR,
                             momentum=optimizer_step.MOMENTUM, weight_decay=optimizer_step.WEIGHT_DECAY,
                             backend=backend, schedule=Interval(2))

    def step(self) -> None:
        self.optimizer.first_step()
        self.optimizer.second_step()


def variants(device) -> dict:
    """Name -> constructor over fresh parameters (the variants of the optimizer-side benchmark)."""
    table = {
        "sgd fused": optimizer_step.FusedBaseSGD,
        "sgd foreach": lambda ps: optimizer_step.FusedBaseSGD(ps, foreach=True),
        "eager SAM": optimizer_step.EagerSAM,
        "foreach SAM": optimizer_step.ForeachSAM,
    }
    for backend in optimizer_step.available_backends(device):
        table[f"sam_kernels SAM [{backend}]"] = lambda ps, b=backend: optimizer_step.FusedSAM(ps, b)
        table[f"sam_kernels SSAM [{backend}]"] = lambda ps, b=backend: optimizer_step.FusedSAM(
            ps, b, renormalize=True)
        table[f"sam_kernels ESAM [{backend}]"] = lambda ps, b=backend: optimizer_step.FusedSAM(
            ps, b, keep=0.6)
    first = optimizer_step.available_backends(device)[0]
    table[f"sam_kernels SAM step(closure) [{first}]"] = lambda ps: ClosureSAM(ps, first)
    table["the closure alone, twice"] = lambda ps: ClosureSAM(ps, first, run_optimizer=False)
    table[f"sam_kernels SAM Interval(2) [{first}]"] = lambda ps: IntervalSAM(ps, first)
    if device.type == "cuda":
        table[f"sam_kernels SAM [{first}, CUDA graph]"] = lambda ps: optimizer_step.GraphedSAM(ps, first)
    return table


def host_round(built: dict, repeats: int) -> dict[str, list[float]]:
    """Host seconds of ``repeats`` calls of each variant, one call of every variant in turn.

    NOTE (interleaved calls): a slow spell of a shared machine lasts milliseconds to a second; with the
    variants taking turns call by call it falls on all of them alike, where in blocks of calls it landed
    on one variant's block and moved the 2000-tensor ratio by 2x between two runs. The order is shuffled
    on every turn (seeded): a call runs with what its predecessor left in the caches, and in a fixed order
    the variant after eager SAM always found them cold (1.6x SSAM's time, which does more)."""
    host: dict[str, list[float]] = {name: [] for name in built}
    order = list(built)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            variant = built[name]
            start = time.perf_counter()
            variant.step()
            host[name].append(time.perf_counter() - start)
    return host


def device_seconds(variant, device, repeats: int) -> float:
    """Device seconds per call of ``repeats`` calls queued back to back (0 on the CPU, where the calls
    are synchronous): the wall time after the last call is queued, until the device is done."""
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    start_all = time.perf_counter()
    for _ in range(repeats):
        variant.step()
    queued = time.perf_counter() - start_all
    torch.cuda.synchronize(device)
    return max(time.perf_counter() - start_all - queued, 0.0) / repeats


def run(counts, device, rounds: int, repeats: int) -> list[dict]:
    rows = []
    for count in counts:
        built = {name: make(make_params(count, device)) for name, make in variants(device).items()}
        for variant in built.values():  # warm-up: plans built, kernels compiled, buffers allocated
            for _ in range(3):
                variant.step()
        samples: dict[str, list[float]] = {name: [] for name in built}
        round_medians: dict[str, list[float]] = {name: [] for name in built}
        for _ in range(rounds):
            for name, host in host_round(built, repeats).items():
                samples[name].extend(host)
                round_medians[name].append(statistics.median(host))
        device_time = {name: device_seconds(variant, device, repeats) for name, variant in built.items()}
        for name, values in samples.items():
            q1, _, q3 = statistics.quantiles(values, n=4)
            # NOTE (round medians): the ratio is taken per round, of the round's median calls; a ratio of
            # single calls pairs two unrelated calls (a collection or a page fault in either one).
            ratio, (low, high) = optimizer_step.round_ratios(round_medians[name], round_medians["sgd fused"])
            rows.append({"params": count, "variant": name, "host_us": statistics.median(values) * 1e6,
                         "q1_us": q1 * 1e6, "q3_us": q3 * 1e6, "vs_sgd_fused": ratio,
                         "vs_sgd_fused_range": [low, high], "device_us": device_time[name] * 1e6})
    return rows


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per tensor count: each sam_kernels SAM row's host time against the fused SGD step's."""
    return [f"host cost, {row['params']} tensors: {row['variant']} {row['vs_sgd_fused']:.2f}x fused SGD "
            f"({row['vs_sgd_fused_range'][0]:.2f}-{row['vs_sgd_fused_range'][1]:.2f})"
            for row in rows if row["variant"].startswith("sam_kernels SAM [")]


def format_table(rows: list[dict], device) -> str:
    lines = ["| params | variant | host time per iteration (median, IQR) | vs fused SGD step |"
             + (" device time |" if device.type == "cuda" else ""),
             "|---:|---|---:|---:|" + ("---:|" if device.type == "cuda" else "")]
    for row in rows:
        line = (f"| {row['params']} | {row['variant']} | {row['host_us']:.0f} us "
                f"({row['q1_us']:.0f}-{row['q3_us']:.0f}) | {row['vs_sgd_fused']:.2f}x |")
        if device.type == "cuda":
            line += f" {row['device_us']:.0f} us |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[161, 2000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--summary", type=Path, help="append the summary lines to this file too")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    rows = run(args.counts, device, args.rounds, args.repeats)
    print(f"device: {optimizer_step.device_name(device)}; torch {torch.__version__}; python "
          f"{sys.version.split()[0]}; {args.rounds} rounds x {args.repeats} calls per variant")
    print(format_table(rows, device))
    optimizer_step.write_summary(summary_lines(rows), args.summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": optimizer_step.device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
