"""Tests of the sharpness diagnostics: the SAM-edge, power iteration, the monitor and the reproduction.

Every check compares with an independent computation: the edge's defining equation and the paper's formula
evaluated in NumPy, ``torch.linalg.eigvalsh`` of known matrices, and the dense Hessian from
``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sam_kernels import diagnostics
from sam_kernels.diagnostics import (
    SharpnessMonitor,
    edge_ratios,
    gd_edge,
    hessian_top_eigenvalue,
    hessian_vector_product,
    load_records,
    plot_sharpness,
    sam_edge,
    save_records,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the edge


def paper_formula(g: float, rho: float, eta: float) -> float:
    """Long & Bartlett's SAM-edge exactly as written, in float64 NumPy."""
    return float(g / (2 * rho) * (np.sqrt(1 + 8 * rho / (eta * g)) - 1))


@pytest.mark.parametrize("seed", range(5))
def test_sam_edge_solves_its_defining_equation(seed):
    rng = np.random.default_rng(seed)
    g = 10.0 ** rng.uniform(-6, 3, size=64)
    rho = 10.0 ** rng.uniform(-4, 0, size=64)
    eta = 10.0 ** rng.uniform(-4, 0, size=64)
    for gi, ri, ei in zip(g, rho, eta, strict=True):
        lam = sam_edge(torch.tensor(gi, dtype=torch.float64), float(ri), float(ei)).item()
        assert ei * lam * (1 + ri * lam / gi) == pytest.approx(2.0, rel=1e-12)
        assert lam > 0


def test_sam_edge_matches_the_papers_formula():
    for g, rho, eta in [(0.5, 0.05, 0.1), (2.0, 0.01, 0.2), (0.03, 0.1, 0.05), (1e-3, 0.02, 1.0)]:
        lam = sam_edge(torch.tensor(g, dtype=torch.float64), rho, eta).item()
        assert lam == pytest.approx(paper_formula(g, rho, eta), rel=1e-9)


def test_sam_edge_tensor_shapes_dtypes_and_tensor_hyperparameters():
    g = torch.tensor([0.1, 1.0, 10.0])
    out = sam_edge(g, 0.05, 0.1)
    assert out.dtype == torch.float32 and out.shape == g.shape
    expected = [paper_formula(float(x), 0.05, 0.1) for x in g]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    rho = torch.tensor([0.0, 0.05, 0.05])
    mixed = sam_edge(torch.tensor([0.0, 1.0, 0.0]), rho, torch.tensor(0.1))
    torch.testing.assert_close(mixed, torch.tensor([20.0, paper_formula(1.0, 0.05, 0.1), 0.0]))
    assert sam_edge(torch.tensor(1.0, dtype=torch.float16), 0.1, 0.1).dtype == torch.float32
    assert sam_edge(0.5, 0.1, 0.1).item() == pytest.approx(paper_formula(0.5, 0.1, 0.1), rel=1e-6)


def test_sam_edge_limits_without_nan():
    eta = 0.1
    # rho -> 0 gives 2 / eta, exactly at rho = 0 and continuously as rho shrinks.
    for g in (0.0, 1e-3, 1.0, 1e6):
        assert sam_edge(torch.tensor(g), 0.0, eta).item() == pytest.approx(2 / eta, rel=1e-7)
    for rho in (1e-6, 1e-9, 1e-12):
        assert sam_edge(torch.tensor(1.0, dtype=torch.float64), rho, eta).item() == pytest.approx(
            2 / eta, rel=10 * rho / eta)
    # ||g|| = 0 gives 0; as ||g|| -> 0 the edge behaves like sqrt(2 ||g|| / (eta rho)).
    assert sam_edge(torch.tensor(0.0), 0.05, eta).item() == 0.0
    for g in (1e-6, 1e-9, 1e-12):
        lam = sam_edge(torch.tensor(g, dtype=torch.float64), 0.05, eta).item()
        assert lam / math.sqrt(2 * g / (eta * 0.05)) == pytest.approx(1.0, rel=1e-3)
    # A huge or infinite norm makes the ascent negligible: back to 2 / eta.
    assert sam_edge(torch.tensor(math.inf), 0.05, eta).item() == pytest.approx(2 / eta)
    assert sam_edge(torch.tensor(1e12, dtype=torch.float64), 0.05, eta).item() == pytest.approx(2 / eta)
    values = sam_edge(torch.tensor([0.0, 1e-30, 1e30, math.inf]), 0.05, eta)
    assert torch.isfinite(values).all()


def test_sam_edge_below_gd_edge_and_monotone():
    eta = 0.2
    g = torch.logspace(-8, 4, 400, dtype=torch.float64)
    for rho in (1e-3, 0.05, 1.0):
        lam = sam_edge(g, rho, eta)
        assert (lam < 2 / eta).all() and (lam > 0).all()
        assert (lam[1:] > lam[:-1]).all()  # a larger gradient norm raises the edge
    rhos = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    edges = [sam_edge(torch.tensor(0.3, dtype=torch.float64), r, eta).item() for r in rhos]
    assert all(a > b for a, b in itertools.pairwise(edges))  # a larger radius lowers it
    assert gd_edge(eta) == 2 / eta


def test_edge_argument_errors():
    with pytest.raises(ValueError, match="lr"):
        sam_edge(torch.tensor(1.0), 0.05, 0.0)
    with pytest.raises(ValueError, match="rho"):
        sam_edge(torch.tensor(1.0), -0.1, 0.1)
    with pytest.raises(ValueError, match="lr"):
        gd_edge(-1.0)


# -------------------------------------------------------------------------------------- power iteration


def symmetric(eigenvalues, seed: int) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q (float64)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def quadratic(a: torch.Tensor):
    """The loss 0.5 w^T A w + b^T w (Hessian A) with w split into two parameter tensors."""
    n = a.shape[0]
    gen = torch.Generator().manual_seed(123)
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    parts = [t.clone().requires_grad_(True) for t in w.split([n // 3, n - n // 3])]

    def loss_fn() -> torch.Tensor:
        x = torch.cat(parts)
        return 0.5 * x @ a @ x + b @ x

    return parts, loss_fn


@pytest.mark.parametrize("seed", range(4))
def test_power_iteration_on_psd_quadratic(seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    a = m @ m.T / 12  # random PSD
    params, loss_fn = quadratic(a)
    result = hessian_top_eigenvalue(loss_fn, params, max_iters=5000, tol=1e-9, seed=seed)
    exact = torch.linalg.eigvalsh(a)[-1].item()
    assert result.converged
    assert result.eigenvalue == pytest.approx(exact, rel=1e-8)
    # The returned vector is the top eigenvector (up to sign).
    v = torch.cat([x.reshape(-1) for x in result.vector])
    assert torch.linalg.norm(a @ v - exact * v).item() < 1e-4 * exact


@pytest.mark.parametrize("seed", range(3))
def test_power_iteration_largest_versus_magnitude_on_indefinite_quadratic(seed):
    # The eigenvalue of largest magnitude is negative: "largest" must find the top algebraic one.
    eigenvalues = [-9.0, -3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 6.0, 6.5]
    a = symmetric(eigenvalues, seed)
    params, loss_fn = quadratic(a)
    exact = torch.linalg.eigvalsh(a)
    largest = hessian_top_eigenvalue(loss_fn, params, max_iters=5000, tol=1e-9, seed=seed)
    magnitude = hessian_top_eigenvalue(loss_fn, params, max_iters=5000, tol=1e-9, which="magnitude",
                                       seed=seed)
    assert largest.converged and magnitude.converged
    assert largest.eigenvalue == pytest.approx(exact[-1].item(), rel=1e-7)
    assert magnitude.eigenvalue == pytest.approx(exact[0].item(), rel=1e-7)
    # With a positive dominant eigenvalue both modes agree.
    params, loss_fn = quadratic(-a)
    for which in ("largest", "magnitude"):
        out = hessian_top_eigenvalue(loss_fn, params, max_iters=5000, tol=1e-9, which=which, seed=seed)
        assert out.eigenvalue == pytest.approx(9.0, rel=1e-7)


def test_power_iteration_float32_and_budget():
    a = symmetric([1.0, 2.0, 3.0, 5.0, 8.0, 10.0], seed=7).float()
    w = torch.randn(6, requires_grad=True)

    def loss_fn():
        return 0.5 * w @ a @ w

    result = hessian_top_eigenvalue(loss_fn, [w], max_iters=500, tol=1e-4)
    assert result.converged and result.eigenvalue == pytest.approx(10.0, rel=1e-4)
    assert result.residual <= 1e-4 * result.eigenvalue
    short = hessian_top_eigenvalue(loss_fn, [w], max_iters=1, tol=1e-12)
    assert short.iterations == 1 and not short.converged
    # Warm start from the converged vector needs far fewer products than a cold start.
    cold = hessian_top_eigenvalue(loss_fn, [w], max_iters=500, tol=1e-3)
    warm = hessian_top_eigenvalue(loss_fn, [w], max_iters=500, tol=1e-3, init=result.vector)
    assert warm.converged and warm.iterations <= 2 < cold.iterations


def tiny_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    return model, x, y


def dense_hessian(model, loss_of_output):
    """Dense Hessian of the loss with respect to all parameters, flattened in parameters() order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of_flat(theta):
        chunks = theta.split([math.prod(s) for s in shapes])
        weights = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_of_output(torch.func.functional_call(model, weights, ()))

    return torch.autograd.functional.hessian(loss_of_flat, flat)


def test_power_iteration_matches_dense_hessian_of_tiny_network():
    model, x, y = tiny_network()
    params = list(model.parameters())

    def loss_fn():
        return ((model(x) - y) ** 2).mean()

    h = dense_hessian(_WithInput(model, x), lambda out: ((out - y) ** 2).mean())
    exact = torch.linalg.eigvalsh(h)
    result = hessian_top_eigenvalue(loss_fn, params, max_iters=20000, tol=1e-9)
    assert result.converged
    assert result.eigenvalue == pytest.approx(exact[-1].item(), rel=1e-6)
    # The Hessian-vector product itself agrees with the dense matrix.
    v = [torch.randn_like(p) for p in params]
    hv = torch.cat([t.reshape(-1) for t in hessian_vector_product(loss_fn, params, v)])
    torch.testing.assert_close(hv, h @ torch.cat([t.reshape(-1) for t in v]))


class _WithInput(nn.Module):
    """A model with its input bound, so functional_call sees the same parameter names."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.model, self.x = model, x

    def forward(self) -> torch.Tensor:
        return self.model(self.x)


def test_chunked_closures_equal_the_full_batch_and_grads_are_untouched():
    model, x, y = tiny_network()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)

    def full():
        return ((model(x) - y) ** 2).mean()

    def chunk(lo, hi):
        return lambda: ((model(x[lo:hi]) - y[lo:hi]) ** 2).sum() / (x.shape[0] * y.shape[1])

    one = hessian_top_eigenvalue(full, params, max_iters=20000, tol=1e-8)
    split = hessian_top_eigenvalue([chunk(0, 5), chunk(5, 16)], params, max_iters=20000, tol=1e-8)
    assert split.eigenvalue == pytest.approx(one.eigenvalue, rel=1e-6)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in params)


def test_batchnorm_buffers_and_modes_are_restored():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randn(32, 1, dtype=torch.float64)
    with torch.no_grad():  # move the running statistics away from their initial values
        model(x * 3 + 1)
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_fn():
        return ((model(x) - y) ** 2).mean()

    train = hessian_top_eigenvalue(loss_fn, params, max_iters=5000, tol=1e-8, model=model)
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    evaluated = hessian_top_eigenvalue(loss_fn, params, max_iters=5000, tol=1e-8, model=model,
                                       eval_mode=True)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # Independent: the dense Hessians of the train-mode and eval-mode losses.
    wrapped = _WithInput(model, x)
    loss = lambda out: ((out - y) ** 2).mean()  # noqa: E731
    train_exact = torch.linalg.eigvalsh(dense_hessian(wrapped, loss))[-1].item()
    model.load_state_dict(before)  # the train-mode forward above moved the running statistics
    model.eval()
    eval_exact = torch.linalg.eigvalsh(dense_hessian(wrapped, loss))[-1].item()
    model.train()
    assert train.eigenvalue == pytest.approx(train_exact, rel=1e-6)
    assert evaluated.eigenvalue == pytest.approx(eval_exact, rel=1e-6)
    assert abs(train_exact - eval_exact) > 1e-3 * abs(eval_exact)  # the two modes really differ


def test_power_iteration_argument_errors():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="which"):
        hessian_top_eigenvalue(lambda: (w**2).sum(), [w], which="smallest")
    with pytest.raises(ValueError, match="max_iters"):
        hessian_top_eigenvalue(lambda: (w**2).sum(), [w], max_iters=0)
    with pytest.raises(ValueError, match="requires_grad"):
        hessian_top_eigenvalue(lambda: (w**2).sum(), [w.detach()])
    with pytest.raises(ValueError, match="loss_fn"):
        hessian_top_eigenvalue(lambda: w**2, [w])
    # A loss linear in the weights has a zero Hessian.
    assert hessian_top_eigenvalue(lambda: w.sum() * 3, [w]).eigenvalue == 0.0


# ------------------------------------------------------------------------------------------------ logger


def run_monitor(steps=12, every=4, rho=0.05, lr=0.1):
    model, x, y = tiny_network()
    params = list(model.parameters())

    def loss_fn():
        return ((model(x) - y) ** 2).mean()

    monitor = SharpnessMonitor(params, lr=lr, rho=rho, loss_fn=loss_fn, every=every, tol=1e-6,
                               max_iters=5000)
    norms, eigs = [], {}
    for step in range(steps):
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params))
        norms.append(norm.item())
        result = monitor.step(norm, loss=loss.detach())
        if step % every == 0:
            assert result is not None
            wrapped = _WithInput(model, x)
            eigs[step] = torch.linalg.eigvalsh(dense_hessian(wrapped, lambda o: ((o - y) ** 2).mean()))[-1]
        else:
            assert result is None
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
    return monitor, norms, eigs


def test_monitor_records_edges_every_step_and_eigenvalue_every_k(tmp_path):
    monitor, norms, eigs = run_monitor()
    records = monitor.records
    assert [r["step"] for r in records] == list(range(12))
    for record, norm in zip(records, norms, strict=True):
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-6)
        assert record["gd_edge"] == pytest.approx(20.0)
        assert record["sam_edge"] == pytest.approx(paper_formula(norm, 0.05, 0.1), rel=1e-5)
        if record["step"] in eigs:
            assert record["eigenvalue"] == pytest.approx(eigs[record["step"]].item(), rel=1e-5)
            assert record["eig_converged"] is True and record["eig_iterations"] >= 1
        else:
            assert record["eigenvalue"] is None
    # Records are plain Python values after the flush.
    assert all(not isinstance(v, torch.Tensor) for r in records for v in r.values())


def test_monitor_writes_well_formed_json_and_csv(tmp_path):
    monitor, _, _ = run_monitor()
    json_path, csv_path = tmp_path / "sharpness.json", tmp_path / "sharpness.csv"
    monitor.save(json_path, meta={"run": "test"})
    monitor.save(csv_path)
    data = json.loads(json_path.read_text())
    assert data["meta"] == {"run": "test"} and len(data["records"]) == 12
    assert set(data["records"][0]) == set(diagnostics.FIELDS)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and rows[1]["eigenvalue"] == "" and rows[0]["eigenvalue"] != ""
    for path in (json_path, csv_path):
        loaded = load_records(path)
        for got, want in zip(loaded, monitor.records, strict=True):
            for key in diagnostics.FIELDS:
                if want[key] is None:
                    assert got[key] is None
                elif isinstance(want[key], float):
                    assert got[key] == pytest.approx(want[key], rel=1e-12)
                else:
                    assert got[key] == want[key]
    with pytest.raises(ValueError, match="suffix"):
        monitor.save(tmp_path / "sharpness.txt")


def test_monitor_without_norm_or_closure_and_lr_schedule():
    w = torch.randn(4, requires_grad=True)
    monitor = SharpnessMonitor([w], lr=0.5, every=0)
    monitor.step()
    monitor.step(torch.tensor(2.0), lr=0.25)
    records = monitor.records
    assert records[0]["sam_edge"] is None and records[0]["gd_edge"] == 4.0
    assert records[1]["sam_edge"] == 8.0 and records[1]["gd_edge"] == 8.0  # rho = 0: the GD edge
    assert all(r["eigenvalue"] is None for r in records)
    forced = monitor.step(measure=True, loss_fn=lambda: (w**2).sum() * 1.5)
    assert forced.eigenvalue == pytest.approx(3.0, rel=1e-6)


def test_non_finite_values_become_null_in_json(tmp_path):
    records = [{k: None for k in diagnostics.FIELDS} | {"step": 0, "gd_edge": 2.0, "eigenvalue": math.nan}]
    save_records(records, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["records"][0]["eigenvalue"] is None


def test_edge_ratios_against_hand_computation():
    records = [{"step": i, "gd_edge": 20.0, "sam_edge": 10.0 + i, "eigenvalue": None} for i in range(8)]
    records[1]["eigenvalue"] = 100.0  # outside the last quarter: ignored
    records[6]["eigenvalue"] = 20.0
    records[7]["eigenvalue"] = 19.0
    out = edge_ratios(records, last_fraction=0.25)
    assert out["measurements"] == 2
    assert out["gd"] == pytest.approx((20 / 20 + 19 / 20) / 2)
    assert out["sam"] == pytest.approx((20 / 16 + 19 / 17) / 2)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    monitor, _, _ = run_monitor()
    path = tmp_path / "plot.png"
    ax = plot_sharpness(monitor.records, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = ax.get_legend_handles_labels()[1]
    assert "SAM-edge" in labels and len(labels) == 3


# ------------------------------------------------------------------------------------------ reproduction


@pytest.mark.slow  # a subprocess that trains two runs and draws the figure
def test_reproduction_script_smoke(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.edge_of_stability", "--steps", "40", "--every", "10",
         "--eig-iters", "30", "--samples", "300", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "lambda / SAM-edge" in proc.stdout
    figure, record = out / "edge_of_stability.png", out / "edge_of_stability.json"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(record.read_text())
    for name in ("gd", "sam"):
        run = data["runs"][name]
        assert len(run) == 40
        eig = [r["eigenvalue"] for r in run if r["eigenvalue"] is not None]
        assert len(eig) == 4 and all(math.isfinite(e) and e > 0 for e in eig)
        assert all(math.isfinite(r["sam_edge"]) and math.isfinite(r["loss"]) for r in run)
        ratios = data["summary"]["ratios"][name]
        assert math.isfinite(ratios["gd"]) and math.isfinite(ratios["sam"])
    # The SAM run's edge sits below 2/eta, GD's equals it.
    assert all(r["sam_edge"] < r["gd_edge"] for r in data["runs"]["sam"])
    assert all(r["sam_edge"] == r["gd_edge"] for r in data["runs"]["gd"])
