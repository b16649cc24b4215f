"""Sharpness diagnostics: the edge of stability of GD and of SAM, measured while training.

Gradient descent with step size ``eta`` drives the largest eigenvalue of the training loss's Hessian up to
about ``2 / eta`` and then hovers there (the edge of stability). Long & Bartlett ("Sharpness-Aware
Minimization and the Edge of Stability", 2023, arXiv 2309.12488) show that SAM with radius ``rho`` hovers
at a lower edge that depends on the gradient norm ``||g||``::

    lambda_edge = (||g|| / (2 rho)) * (sqrt(1 + 8 rho / (eta ||g||)) - 1),

the root of ``eta * lambda * (1 + rho * lambda / ||g||) = 2``: on a quadratic with curvature ``lambda``
along the top eigenvector, one SAM step multiplies that component by
``1 - eta * lambda * (1 + rho * lambda / ||g||)``, which leaves [-1, 1] beyond the edge.

This module gives
- ``sam_edge`` / ``gd_edge``: the two edges, from the gradient-norm tensor the optimizer already computes
  (``sam_kernels.ops.grad_norm``), with device ops only (no host sync);
- ``hessian_top_eigenvalue``: the top Hessian eigenvalue by power iteration on Hessian-vector products
  (double backward), for a mini-batch or the full batch;
- ``SharpnessMonitor``: a logger a training loop calls every step, which records both edges every step and
  the eigenvalue every ``every`` steps, and writes CSV or JSON;
- ``plot_sharpness``: the eigenvalue against both edges over training (matplotlib, imported lazily).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

Tensors = Sequence[torch.Tensor]
LossFn = Callable[[], torch.Tensor]

__all__ = [
    "EigenResult",
    "SharpnessMonitor",
    "edge_ratios",
    "gd_edge",
    "hessian_top_eigenvalue",
    "hessian_vector_product",
    "load_records",
    "plot_sharpness",
    "sam_edge",
    "save_records",
]


# ----------------------------------------------------------------------------------------------- edges


def gd_edge(lr: float) -> float:
    """``2 / lr``: the largest Hessian eigenvalue at which gradient descent with step ``lr`` is stable."""
    if not lr > 0:
        raise ValueError(f"lr: must be positive, got {lr}")
    return 2.0 / lr


def sam_edge(grad_norm: torch.Tensor | float, rho: float | torch.Tensor,
             lr: float | torch.Tensor) -> torch.Tensor:
    """SAM's edge of stability (Long & Bartlett 2023, eq. for the SAM-edge) as a device tensor.

    ``grad_norm`` is ``||g||`` at the current weights: the norm of the *ascent* gradient, the one that SAM
    normalizes (``sam_kernels.ops.grad_norm`` returns it each step). Computed as
    ``(4 / lr) / (1 + sqrt(1 + 8 rho / (lr ||g||)))``, algebraically the paper's formula but free of the
    cancellation in ``sqrt(...) - 1``. Limits, without NaN: ``rho = 0`` gives ``2 / lr``; ``||g|| = 0``
    gives 0 (it vanishes like ``sqrt(2 ||g|| / (lr rho))``); an infinite norm gives ``2 / lr``. For
    ``rho > 0`` and a finite norm it is strictly below ``2 / lr``. Only tensor-scalar ops on the norm's
    device: no host sync, so it is free to call every step. The result has the norm's shape and at least
    fp32 precision (fp64 in, fp64 out).
    """
    if not isinstance(lr, torch.Tensor) and not lr > 0:
        raise ValueError(f"lr: must be positive, got {lr}")
    if not isinstance(rho, torch.Tensor) and not rho >= 0:
        raise ValueError(f"rho: must be non-negative, got {rho}")
    g = torch.as_tensor(grad_norm)
    g = g.to(torch.promote_types(g.dtype, torch.float32))
    if isinstance(rho, torch.Tensor):
        # NOTE: where() selects 0 for rho == 0, hiding the 0/0 of a zero norm and a zero radius.
        x = torch.where(rho > 0, (8 * rho / lr) / g, 0.0)
    elif rho == 0:
        x = torch.zeros_like(g)
    else:
        x = (8.0 * rho / lr) / g
    return (4.0 / lr) / (1.0 + torch.sqrt(1.0 + x))


# -------------------------------------------------------------------------------------- power iteration


@dataclass
class EigenResult:
    """Outcome of ``hessian_top_eigenvalue``.

    ``residual`` is ``||H v - eigenvalue * v||`` for the unit vector of the last iteration: by the
    Bauer-Fike bound some eigenvalue of the (symmetric) Hessian lies within it. ``vector`` is the last
    iterate, one tensor per parameter; pass it back as ``init`` to warm-start the next measurement.
    """

    eigenvalue: float
    iterations: int
    converged: bool
    residual: float
    vector: list[torch.Tensor] = field(repr=False)


def _dot(a: Tensors, b: Tensors) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def _check_params(params: Tensors) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params: expected at least one parameter")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError(f"params[{i}]: expected a tensor with requires_grad=True")
    return params


def _loss_fns(loss_fn: LossFn | Sequence[LossFn]) -> list[LossFn]:
    fns = [loss_fn] if callable(loss_fn) else list(loss_fn)
    if not fns or not all(callable(f) for f in fns):
        raise ValueError("loss_fn: expected a callable returning the loss, or a non-empty sequence of them")
    return fns


def _graph_grads(fn: LossFn, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Gradients of ``fn()`` with their graph kept, so they can be differentiated again."""
    with torch.enable_grad():
        loss = fn()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn: must return a one-element loss tensor")
        return list(torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True))


def _grads_times(grads: list[torch.Tensor | None], params: list[torch.Tensor], vector: Tensors,
                 retain: bool) -> list[torch.Tensor]:
    """``H v``: the derivative of ``<grad, v>`` with respect to the parameters."""
    out = [torch.zeros_like(p) for p in params]
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:  # the gradient does not depend on the weights: the loss is linear in them
        return out
    hv = torch.autograd.grad([grads[i] for i in live], params,
                             grad_outputs=[vector[i].to(grads[i].dtype) for i in live],
                             retain_graph=retain, allow_unused=True)
    for i, h in enumerate(hv):
        if h is not None:
            out[i] = h.detach()
    return out


def hessian_vector_product(loss_fn: LossFn | Sequence[LossFn], params: Tensors,
                           vector: Tensors) -> list[torch.Tensor]:
    """``H v`` for the Hessian of the loss with respect to ``params`` (double backward).

    ``loss_fn`` returns the loss (it must not call ``backward``); a sequence of closures means the sum of
    their losses (the full batch in chunks: let each return its chunk's share of the mean). The ``.grad``
    of the parameters is left untouched.
    """
    params = _check_params(params)
    vector = list(vector)
    if len(vector) != len(params):
        raise ValueError(f"vector: expected {len(params)} tensors (one per parameter), got {len(vector)}")
    total = [torch.zeros_like(p) for p in params]
    for fn in _loss_fns(loss_fn):
        hv = _grads_times(_graph_grads(fn, params), params, vector, retain=False)
        total = [t + h for t, h in zip(total, hv, strict=True)]
    return total


@contextmanager
def _measurement_mode(model: torch.nn.Module | None, eval_mode: bool) -> Iterator[None]:
    """Optionally switch ``model`` to eval mode; always give back its modes and buffers unchanged."""
    if model is None:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _power_iteration(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], v: list[torch.Tensor],
                     shift: float, max_iters: int, tol: float) -> tuple[float, int, bool, float, list]:
    """Power iteration on ``H - shift * I`` from ``v``.

    Returns (eigenvalue of H, iterations, converged, residual, last unit vector).
    """
    norm = math.sqrt(float(_dot(v, v)))
    if norm == 0 or not math.isfinite(norm):
        raise ValueError("init: the start vector must be finite and nonzero")
    v = [x / norm for x in v]
    value, residual = 0.0, math.inf
    for iteration in range(1, max_iters + 1):
        hv = hvp(v)
        if shift:
            hv = [h - shift * x for h, x in zip(hv, v, strict=True)]
        value = float(_dot(v, hv))  # Rayleigh quotient of the unit vector v (one host sync per iteration)
        r = [h - value * x for h, x in zip(hv, v, strict=True)]
        residual = math.sqrt(float(_dot(r, r)))
        hv_norm = math.sqrt(float(_dot(hv, hv)))
        if not math.isfinite(value) or not math.isfinite(hv_norm):
            return math.nan, iteration, False, math.nan, v
        if hv_norm == 0:  # v lies in the null space of the operator: its eigenvalue is exactly 0
            return value + shift, iteration, True, 0.0, v
        v = [h / hv_norm for h in hv]
        if residual <= tol * abs(value + shift):
            return value + shift, iteration, True, residual, v
    return value + shift, max_iters, False, residual, v


def hessian_top_eigenvalue(loss_fn: LossFn | Sequence[LossFn], params: Tensors, *, max_iters: int = 100,
                           tol: float = 1e-2, which: str = "largest", init: Tensors | None = None,
                           seed: int = 0, model: torch.nn.Module | None = None,
                           eval_mode: bool = False) -> EigenResult:
    """Top eigenvalue of the loss's Hessian at the current weights, by power iteration on ``H v``.

    Long & Bartlett (2023) track the Hessian's operator norm this way. ``loss_fn`` returns the loss on the
    data to measure: a fixed mini-batch, or the full batch; a sequence of closures is summed (the full batch
    in chunks that do not fit in memory at once; let each return its share of the mean). With one closure
    the loss and its gradient graph are built once and every iteration costs one double backward; with
    several, every iteration rebuilds each chunk's graph.

    ``which="largest"`` (default) returns the largest *algebraic* eigenvalue, the one that decides the
    stability of GD and SAM: power iteration first finds the eigenvalue of largest magnitude; if that is
    negative it runs again on ``H - lambda * I``, whose top eigenvalue is the largest one shifted.
    ``which="magnitude"`` returns the signed eigenvalue of largest magnitude (its absolute value is the
    operator norm). Near the edge of stability the two agree.

    The estimate is the Rayleigh quotient ``v.Hv`` of the current unit vector. The iteration stops when
    the residual ``||H v - lambda v||`` is at most ``tol * |lambda|``, which certifies that an eigenvalue of
    H lies within ``tol * |lambda|`` of the estimate (for an isolated eigenvalue the error is quadratic in
    the residual), or after ``max_iters`` Hessian-vector products (``converged=False``); ``iterations``
    counts the products. The residual test, unlike a test on the change of the quotient, does not stop
    early when the top eigenvalues are clustered and the quotient creeps up slowly, as it does for
    networks at the edge of stability.
    Each iteration reads one scalar on the host: this is a periodic measurement, not a per-step op.
    ``init`` warm-starts from a previous ``EigenResult.vector``; otherwise the start is a Gaussian vector
    drawn from ``seed``. The parameters' ``.grad`` is not touched.

    BatchNorm and other stateful modules: pass ``model`` and every buffer of it (BatchNorm's running
    statistics) is restored after the measurement, so measuring never changes training. By default the
    model stays in its current mode, so a training-mode BatchNorm normalizes with batch statistics: the
    Hessian is that of the objective the optimizer differentiates. ``eval_mode=True`` measures the
    inference-mode loss (running statistics, dropout off) instead. With one closure a training-mode
    dropout mask is drawn once and held for all iterations; with several closures set ``eval_mode``.
    """
    if which not in ("largest", "magnitude"):
        raise ValueError(f"which: expected 'largest' or 'magnitude', got {which!r}")
    if max_iters < 1:
        raise ValueError(f"max_iters: must be at least 1, got {max_iters}")
    if not tol >= 0:
        raise ValueError(f"tol: must be non-negative, got {tol}")
    params = _check_params(params)
    fns = _loss_fns(loss_fn)
    generator = torch.Generator(device=params[0].device).manual_seed(seed)

    def random_start() -> list[torch.Tensor]:
        return [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params]

    if init is not None:
        start = [x.detach().to(p.dtype).clone() for x, p in zip(init, params, strict=True)]
    else:
        start = random_start()
    with _measurement_mode(model, eval_mode):
        if len(fns) == 1:
            grads = _graph_grads(fns[0], params)

            def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
                return _grads_times(grads, params, v, retain=True)
        else:
            def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
                return hessian_vector_product(fns, params, v)

        value, used, converged, residual, vector = _power_iteration(hvp, start, 0.0, max_iters, tol)
        if which == "largest" and value < 0 and used < max_iters:
            # The dominant eigenvalue is negative: every eigenvalue of H - value * I is >= 0 and its top
            # one is (largest eigenvalue - value).
            value, extra, converged, residual, vector = _power_iteration(
                hvp, random_start(), value, max_iters - used, tol)
            used += extra
        elif which == "largest" and value < 0:
            converged = False
    return EigenResult(value, used, converged, residual, vector)


# ------------------------------------------------------------------------------------------------ logger

FIELDS = ("step", "loss", "grad_norm", "lr", "rho", "gd_edge", "sam_edge", "eigenvalue",
          "eig_iterations", "eig_converged")


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).float()
    return value


class SharpnessMonitor:
    """Logs the stability edges every step and the Hessian's top eigenvalue every ``every`` steps.

    Call ``step(norm)`` once per training step with the ascent-gradient norm the optimizer computed
    (``norm, _ = sam_kernels.ops.grad_norm(params)``), ideally before the weights move (before
    ``perturb_``), so the norm and the eigenvalue belong to the same weights. The SAM-edge is computed on
    the device and kept there; values reach the host only when an eigenvalue is measured (that measurement
    syncs anyway) or when ``records`` / ``save`` is called. ``loss_fn`` (a closure returning the loss on a
    fixed mini-batch or the full batch; see ``hessian_top_eigenvalue``) enables the eigenvalue; successive
    measurements warm-start from the previous eigenvector, so each takes a few Hessian-vector products.
    Without eigenvalue measurements the device values are fetched once every ``FLUSH_ROWS`` steps.
    """

    FLUSH_ROWS = 1000

    def __init__(self, params: Tensors, *, lr: float, rho: float = 0.0, loss_fn: LossFn | None = None,
                 every: int = 10, max_iters: int = 100, tol: float = 1e-2, which: str = "largest",
                 model: torch.nn.Module | None = None, eval_mode: bool = False, seed: int = 0) -> None:
        if every < 0:
            raise ValueError(f"every: must be non-negative (0 disables the eigenvalue), got {every}")
        gd_edge(lr)
        self.params = list(params)
        self.lr, self.rho, self.loss_fn = lr, rho, loss_fn
        self.every, self.max_iters, self.tol, self.which = every, max_iters, tol, which
        self.model, self.eval_mode, self.seed = model, eval_mode, seed
        self.steps = 0
        self._vector: list[torch.Tensor] | None = None
        self._rows: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []

    def step(self, grad_norm: torch.Tensor | float | None = None, *, loss: torch.Tensor | float | None = None,
             lr: float | None = None, rho: float | None = None, loss_fn: LossFn | None = None,
             measure: bool | None = None) -> EigenResult | None:
        """Record one training step; returns the eigenvalue measurement when one ran, else None.

        ``lr`` / ``rho`` override the constructor's values from this step on (a learning-rate schedule).
        ``measure`` forces (True) or skips (False) the eigenvalue regardless of ``every``.
        """
        if lr is not None:
            gd_edge(lr)
            self.lr = lr
        if rho is not None:
            self.rho = rho
        row: dict[str, Any] = {"step": self.steps, "loss": _scalar(loss), "lr": self.lr, "rho": self.rho,
                               "gd_edge": 2.0 / self.lr, "grad_norm": None, "sam_edge": None,
                               "eigenvalue": None, "eig_iterations": None, "eig_converged": None}
        if grad_norm is not None:
            norm = _scalar(grad_norm) if isinstance(grad_norm, torch.Tensor) else float(grad_norm)
            row["grad_norm"] = norm
            row["sam_edge"] = sam_edge(norm, self.rho, self.lr) if self.rho else 2.0 / self.lr
        fn = loss_fn if loss_fn is not None else self.loss_fn
        due = self.every > 0 and self.steps % self.every == 0 if measure is None else measure
        result = None
        if due and fn is not None:
            result = hessian_top_eigenvalue(fn, self.params, max_iters=self.max_iters, tol=self.tol,
                                            which=self.which, init=self._vector, seed=self.seed,
                                            model=self.model, eval_mode=self.eval_mode)
            if math.isfinite(result.eigenvalue):
                self._vector = result.vector
            row.update(eigenvalue=result.eigenvalue, eig_iterations=result.iterations,
                       eig_converged=result.converged)
        self._pending.append(row)
        self.steps += 1
        if result is not None or len(self._pending) >= self.FLUSH_ROWS:
            self._flush()
        return result

    def _flush(self) -> None:
        """Move the pending device scalars to the host with one transfer."""
        slots = [(row, key) for row in self._pending for key, value in row.items()
                 if isinstance(value, torch.Tensor)]
        for device in {row[key].device for row, key in slots}:
            here = [(row, key) for row, key in slots if row[key].device == device]
            values = torch.stack([row[key].to(torch.float64) for row, key in here]).cpu().tolist()
            for (row, key), value in zip(here, values, strict=True):
                row[key] = value
        self._rows.extend(self._pending)
        self._pending = []

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every step recorded so far, one dict per step (keys: ``FIELDS``; None where not measured)."""
        self._flush()
        return [dict(row) for row in self._rows]

    def save(self, path: str | os.PathLike, *, meta: dict[str, Any] | None = None) -> None:
        """Write the records as CSV or JSON, chosen by the file suffix (``.csv`` / ``.json``).

        JSON holds ``{"meta": ..., "records": [...]}`` with null for values not measured (and for
        non-finite numbers, which JSON cannot express); CSV leaves those cells empty.
        """
        save_records(self.records, path, meta=meta)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_records(records: Sequence[dict[str, Any]], path: str | os.PathLike, *,
                 meta: dict[str, Any] | None = None) -> None:
    """Write records (``SharpnessMonitor.records``) to ``path``: CSV or JSON by its suffix."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".json":
        data = {"meta": meta or {}, "records": [{k: _clean(v) for k, v in r.items()} for r in records]}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, allow_nan=False)
    elif suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(FIELDS))
            writer.writeheader()
            for record in records:
                writer.writerow({k: "" if _clean(record.get(k)) is None else record[k] for k in FIELDS})
    else:
        raise ValueError(f"path: expected a .csv or .json suffix, got {path!r}")


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read records written by ``save_records`` (CSV or JSON) back as dicts of Python numbers or None."""
    path = os.fspath(path)
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)["records"]
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))

    def parse(key: str, text: str) -> Any:
        if text == "":
            return None
        if key == "eig_converged":
            return text == "True"
        return int(text) if key in ("step", "eig_iterations") else float(text)

    return [{k: parse(k, v) for k, v in row.items()} for row in rows]


def edge_ratios(records: Sequence[dict[str, Any]], *, last_fraction: float = 0.25) -> dict[str, float]:
    """Mean of eigenvalue / edge over the measured steps in the last ``last_fraction`` of the records.

    Returns ``{"gd": mean of lambda / (2 / lr), "sam": mean of lambda / sam_edge, "measurements": n}``,
    each ratio taken at the step of its measurement (the SAM-edge with that step's gradient norm).
    """
    if not 0 < last_fraction <= 1:
        raise ValueError(f"last_fraction: must be in (0, 1], got {last_fraction}")
    start = len(records) - max(1, math.ceil(last_fraction * len(records)))
    tail = [r for r in records[start:] if r.get("eigenvalue") is not None]
    gd = [r["eigenvalue"] / r["gd_edge"] for r in tail]
    sam = [r["eigenvalue"] / r["sam_edge"] for r in tail if r.get("sam_edge")]
    return {"gd": sum(gd) / len(gd) if gd else math.nan,
            "sam": sum(sam) / len(sam) if sam else math.nan,
            "measurements": float(len(tail))}


# -------------------------------------------------------------------------------------------------- plot


def plot_sharpness(records: Sequence[dict[str, Any]], path: str | os.PathLike | None = None, *,
                   ax: Any = None, title: str | None = None, sam: bool = True) -> Any:
    """Plot the measured top eigenvalue against ``2 / lr`` and the SAM-edge over training.

    The layout of Long & Bartlett's (2023) figures: the eigenvalue as dots at the measured steps, ``2/eta``
    dashed, the SAM-edge (``sam=True``, per step, with that step's gradient norm) as a thin line. Draws on
    ``ax`` when given, else on a new figure saved to ``path``; returns the axes. Needs matplotlib (imported
    here, not with the module); uses no pyplot state, so it works headless.
    """
    if ax is None:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = figure.subplots()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["gd_edge"] for r in records], "--", color="black", lw=1.2, label=r"$2/\eta$")
    edge = [(r["step"], r["sam_edge"]) for r in records if r.get("sam_edge") is not None]
    if sam and edge and any(r.get("rho") for r in records):
        ax.plot(*zip(*edge, strict=True), color="tab:orange", lw=0.8, alpha=0.9, label="SAM-edge")
    eig = [(r["step"], r["eigenvalue"]) for r in records if r.get("eigenvalue") is not None]
    if eig:
        ax.plot(*zip(*eig, strict=True), "o-", color="tab:blue", ms=2.5, lw=0.8,
                label=r"$\lambda_{\max}(\nabla^2 L)$")
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue")
    ax.set_ylim(bottom=0)
    if title:
        ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    if path is not None:
        ax.figure.savefig(os.fspath(path), dpi=150)
    return ax
