"""``python -m sam_kernels.selftest`` on this machine: its CPU part passes, it says what it skipped, and
a wrong kernel makes it fail."""

import json

import pytest
import torch

from sam_kernels import selftest
from sam_kernels.backends import native_status


@pytest.mark.slow  # NOTE (test time): runs every op on every backend; CI's compat stage runs it too
def test_selftest_passes_here_and_lists_its_skips(tmp_path, capsys):
    path = tmp_path / "selftest.json"
    assert selftest.main(["--quick", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["failed"] == 0 and record["passed"] > 0
    names = [r["name"] for r in record["results"] if r["passed"]]
    if native_status("cpu")[0]:
        assert "ops native cpu 30 tensors float32" in names
    if not torch.cuda.is_available():
        assert any(r["passed"] is None and "GPU" in r["name"] for r in record["results"])
    assert "PASS ops" in capsys.readouterr().out


class OpsWithAWrongBackend:
    """The op layer with one more backend, "wrong": the reference, except that its fused SGD descent
    adds 1e-2 to every weight."""

    def __init__(self, ops):
        self.ops = ops

    def __getattr__(self, name):
        op = getattr(self.ops, name)

        def call(*args, **kwargs):
            backend = kwargs.get("backend")
            if backend == "wrong":
                kwargs["backend"] = "torch"
            out = op(*args, **kwargs)
            if backend == "wrong" and name == "restore_sgd_step_":
                for p in args[0]:
                    p.add_(1e-2)
            return out

        return call


def test_selftest_fails_on_a_wrong_kernel(monkeypatch):
    """The check compares a backend with the reference: a kernel that is off fails it."""
    monkeypatch.setattr(selftest, "ops", OpsWithAWrongBackend(selftest.ops))
    result = selftest.check_ops("wrong", torch.device("cpu"), 3, torch.float32)
    assert result.passed is False and "SGD step" in result.detail, result
    assert selftest.check_ops("torch", torch.device("cpu"), 3, torch.float32).passed
