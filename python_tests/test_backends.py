"""The backend registry: automatic choice, the environment override, and clear errors."""

import pytest
import torch

from sam_kernels import backends

CPU = torch.device("cpu")


def test_auto_picks_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    name, reason = backends.resolve(CPU)
    assert name in {"torch", "cpu", "native"} and reason.startswith("auto")


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "triton")
    assert backends.resolve(CPU)[0] == "triton"
    assert backends.resolve(CPU, "torch")[0] == "torch", "an explicit argument wins over the environment"


def test_unknown_backend_names_the_source(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match=backends.BACKEND_ENV):
        backends.resolve(CPU)
    with pytest.raises(ValueError, match="backend argument"):
        backends.resolve(CPU, "fastest")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backends.resolve(CPU, "triton")


def test_report_names_the_running_backend():
    text = backends.report()
    assert "cpu: runs" in text and backends.BACKEND_ENV in text


def test_info_reports_the_machine_and_fails_on_an_unusable_request(monkeypatch, capsys):
    from sam_kernels import info

    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert info.main() == 0
    out = capsys.readouterr().out
    assert "triton " in out and "threads" in out and torch.backends.cpu.get_cpu_capability() in out
    monkeypatch.setenv(backends.BACKEND_ENV, "no-such-backend")
    assert info.main() == 1
    assert "unknown backend 'no-such-backend'" in capsys.readouterr().err
