"""The generalization benchmark's smoke setting: every optimizer trains, and the passes per step its
hooks measure are the ones each optimizer's compute model says."""

import json
import math

import pytest

from benchmarks import generalization

#: (forward, backward) passes per step over the quick run's 40 steps (a multiple of k = 5).
EXPECTED = {
    "SGD": (1.0, 1.0),
    "SAM": (2.0, 2.0),
    "ASAM": (2.0, 2.0),
    "SSAM": (2.0, 2.0),
    "ESAM": (3.0, 2.0),  # gamma < 1: the no-grad pass at w + e is a forward
    "IntervalSAM": (1.2, 1.2),
    "LateSAM": (1.5, 1.5),
    "LookSAM": (1.2, 1.2),
    "MSAM": (1.0, 1.0),
}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("generalization")
    argv = ["--quick", "--backend", "torch", "--no-progress", "--json", str(out / "generalization.json"),
            "--figure", str(out / "generalization.png")]
    returned = generalization.main(argv)
    with open(out / "generalization.json", encoding="utf-8") as handle:
        written = json.load(handle)
    assert written["results"] == json.loads(json.dumps(returned["results"]))
    return written, out


def test_every_optimizer_on_every_model_has_finite_accuracies(record):
    written, out = record
    assert written["config"]["backend"] == "torch"
    assert set(written["results"]) == set(generalization.MODELS)
    for kind, summary in written["results"].items():
        assert list(summary) == list(generalization.OPTIMIZERS), kind
        for name, entry in summary.items():
            assert len(entry["test_accuracy"]) == 1, (kind, name)
            for value in (*entry["test_accuracy"], entry["test_accuracy_mean"], entry["test_accuracy_std"],
                          entry["noisy_labels_fit"], entry["epoch_seconds_median"]):
                assert math.isfinite(value), (kind, name)
            assert 0.0 <= entry["test_accuracy_mean"] <= 1.0
    assert (out / "generalization.png").stat().st_size > 0


def test_measured_passes_match_each_compute_model(record):
    written, _ = record
    for kind, summary in written["results"].items():
        for name, entry in summary.items():
            measured = (entry["forward_passes_per_step"], entry["backward_passes_per_step"])
            if name in EXPECTED:
                assert measured == pytest.approx(EXPECTED[name], abs=1e-12), (kind, name)
                assert tuple(entry["expected_passes_per_step"]) == pytest.approx(EXPECTED[name])
            else:  # RandomSAM, AE-SAM: one or two passes per step, decided step by step
                assert entry["expected_passes_per_step"] is None
                assert 1.0 <= measured[1] <= 2.0, (kind, name)
                assert measured[0] == measured[1], (kind, name)
        esam = summary["ESAM"]
        # NOTE: the selected half of the batch goes through the last forward and backward.
        assert esam["forward_batches_per_step"] == pytest.approx(2.5)
        assert esam["backward_batches_per_step"] == pytest.approx(1.5)
        assert summary["SGD"]["backward_batches_per_step"] == pytest.approx(1.0)
