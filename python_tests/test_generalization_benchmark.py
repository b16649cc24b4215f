"""The generalization benchmark at a tiny setting: every optimizer trains one epoch at every point of a
two-radius grid, the choice reads the validation split only, and the passes per step its hooks measure
are the ones each optimizer's compute model says."""

import dataclasses
import json
import math

import pytest
import torch

from benchmarks import generalization

#: The tiny setting: the mlp, two radii (times each swept hyper-parameter's two values), one epoch of
#: 5 steps (320 images trained on), one sweep seed and one report seed.
TINY = generalization.Scale(("mlp",), (0.1, 0.4), epochs=1, sweep_seeds=1, seeds=1)
TINY_FIT = 320

#: (forward, backward) passes per step over the tiny run's 5 steps (a multiple of k = 5).
EXPECTED = {
    "SGD": (1.0, 1.0),
    "SAM": (2.0, 2.0),
    "ASAM": (2.0, 2.0),
    "SSAM": (2.0, 2.0),
    "ESAM": (3.0, 2.0),  # gamma < 1: the no-grad pass at w + e is a forward
    "IntervalSAM": (1.2, 1.2),
    "LateSAM": (1.4, 1.4),  # SAM on the last 2 of 5 steps (from step ceil(2.5) = 3 on)
    "LookSAM": (1.2, 1.2),
    "MSAM": (1.0, 1.0),
    "GSAM": (2.0, 2.0),
    "WSAM": (2.0, 2.0),
    "FriendlySAM": (2.0, 2.0),
    "VaSSO": (2.0, 2.0),
    "FisherSAM": (2.0, 2.0),
    "GCSAM": (2.0, 2.0),
    "MultiStepSAM": (3.0, 3.0),  # two ascent steps, then the descent's pass
    "MicroBatchSAM": (8.0, 8.0),  # both passes of each of 4 micro-batches: 2 batches of work
    "SparseSAM-F": (2.0, 2.0),
    "SparseSAM-D": (2.0, 2.0),
    "BSAM": (2.0, 2.0),  # at the sample, then at the ascent
    "AdamW": (1.0, 1.0),
    "MSAM-AdamW": (1.0, 1.0),  # the gradient at w~ only
}


class Spy:
    """Records, in order, which split each accuracy reads ("fit", "val", "test", or "noisy" for the
    flipped part of the fit split) and each choice made."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[str] = []
        self.split = None
        load_split, accuracy, choose = (generalization.load_split, generalization.Run.accuracy,
                                        generalization.choose)

        def spy_load_split():
            self.split = load_split()
            return self.split

        def spy_accuracy(run, x, y):
            self.events.append(self.name_of(x))
            return accuracy(run, x, y)

        def spy_choose(scores):
            self.events.append("choose")
            return choose(scores)

        monkeypatch.setattr(generalization, "load_split", spy_load_split)
        monkeypatch.setattr(generalization.Run, "accuracy", spy_accuracy)
        monkeypatch.setattr(generalization, "choose", spy_choose)

    def name_of(self, x: torch.Tensor) -> str:
        for name in ("fit", "val", "test"):
            if x is getattr(self.split, name)[0]:
                return name
        return "noisy"


def run_tiny(out, monkeypatch, argv=()):
    monkeypatch.setattr(generalization, "QUICK", TINY)
    monkeypatch.setattr(generalization, "FIT_SIZE", TINY_FIT)
    return generalization.main(["--backend", "torch", "--no-progress", "--json", str(out / "record.json"),
                                "--figure", str(out / "figure.png"), *argv])


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("generalization")
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy = Spy(monkeypatch)
        returned = run_tiny(out, monkeypatch)
    with open(out / "record.json", encoding="utf-8") as handle:
        written = json.load(handle)
    assert written["results"] == json.loads(json.dumps(returned["results"]))
    return written, out, spy


def test_every_optimizer_runs_at_every_point_of_its_grid(record):
    written, out, _ = record
    assert written["config"]["backend"] == "torch"
    assert written["config"]["sweep_seeds"] == 1 and written["config"]["report_seeds"] == [1]
    assert written["config"]["steps_per_epoch"] == 5
    summary = written["results"]["mlp"]
    assert list(written["results"]) == ["mlp"]
    assert list(summary) == list(generalization.OPTIMIZERS)
    assert set(generalization.OPTIMIZERS) == set(EXPECTED) | {"RandomSAM", "AE-SAM"}
    for name, entry in summary.items():
        variant = generalization.VARIANTS[name]
        radii = [None] if variant.rho_scale is None else [variant.rho_scale * r for r in TINY.rho_grid]
        values = list(variant.values) or [None]
        swept = [(point["rho"], point["param_value"]) for point in entry["sweep"]]
        expected = [(r, v) for r in radii for v in values]
        assert len(swept) == len(expected), name
        for (rho, value), (expected_rho, expected_value) in zip(swept, expected):
            assert value == expected_value, name
            assert rho == expected_rho or math.isclose(rho, expected_rho, rel_tol=1e-9), name
        for point in entry["sweep"]:
            assert 0.0 <= point["validation_accuracy_mean"] <= 1.0, name
        best = max(point["validation_accuracy_mean"] for point in entry["sweep"])
        assert entry["validation_accuracy"] == best, name
        assert (entry["rho"], entry["param_value"]) in swept, name
        assert entry["param"] == variant.param, name
        assert len(entry["test_accuracy"]) == 1, name
        for value in (*entry["test_accuracy"], entry["test_accuracy_std"], entry["noisy_labels_fit"],
                      entry["report_validation_accuracy"], entry["epoch_seconds_median"]):
            assert math.isfinite(value), name
        assert 0.0 <= entry["test_accuracy_mean"] <= 1.0
    assert (out / "figure.png").stat().st_size > 0
    table = written["table"]
    assert "| val acc (%) |" in table and "| swept |" in table and "alpha=" in table


def test_the_choice_reads_the_validation_split_only(record):
    """Structurally: the sweep is handed the training data only, and every accuracy read before the last
    choice is on the validation split; the test split is read only after every choice, by the report."""
    _, _, spy = record
    fields = {field.name for field in dataclasses.fields(generalization.TrainingData)}
    assert fields == {"fit_x", "fit_y", "noisy", "val_x", "val_y"}
    events = spy.events
    last_choice = len(events) - 1 - events[::-1].index("choose")
    assert events.count("choose") == len(generalization.OPTIMIZERS)
    before = events[:last_choice]
    assert set(before) == {"val", "choose"}
    # NOTE: one validation read per setting of the grid (one sweep seed).
    assert before.count("val") == sum(len(generalization.grid(name, TINY.rho_grid))
                                      for name in generalization.OPTIMIZERS)
    after = events[last_choice + 1:]
    assert after.count("test") == len(generalization.OPTIMIZERS)


def test_the_choice_does_not_depend_on_the_test_split(tmp_path, monkeypatch):
    """With the test labels replaced by others, the sweep scores and the choices stay the same and only
    the test accuracies change."""
    load_split = generalization.load_split
    argv = ["--optimizers", "SAM", "GSAM", "--no-figure"]
    first = run_tiny(tmp_path, monkeypatch, argv)["results"]["mlp"]

    def shuffled_test_labels():
        split = load_split()
        x, y = split.test
        return dataclasses.replace(split, test=(x, (y + 1) % 10))

    monkeypatch.setattr(generalization, "load_split", shuffled_test_labels)
    second = run_tiny(tmp_path, monkeypatch, argv)["results"]["mlp"]
    for name in ("SAM", "GSAM"):
        for key in ("sweep", "rho", "param_value", "validation_accuracy", "report_validation_accuracy"):
            assert first[name][key] == second[name][key], (name, key)
        assert first[name]["test_accuracy"] != second[name]["test_accuracy"], name


def test_measured_passes_match_each_compute_model(record):
    written, _, _ = record
    for name, entry in written["results"]["mlp"].items():
        measured = (entry["forward_passes_per_step"], entry["backward_passes_per_step"])
        if name in EXPECTED:
            assert measured == pytest.approx(EXPECTED[name], abs=1e-12), name
            assert tuple(entry["expected_passes_per_step"]) == pytest.approx(EXPECTED[name])
        else:  # RandomSAM, AE-SAM: one or two passes per step, decided step by step
            assert entry["expected_passes_per_step"] is None
            assert 1.0 <= measured[1] <= 2.0, name
            assert measured[0] == measured[1], name
    summary = written["results"]["mlp"]
    esam = summary["ESAM"]
    # NOTE: the selected half of the batch goes through the last forward and backward.
    assert esam["forward_batches_per_step"] == pytest.approx(2.5)
    assert esam["backward_batches_per_step"] == pytest.approx(1.5)
    assert summary["SGD"]["backward_batches_per_step"] == pytest.approx(1.0)
    # NOTE: micro-batch SAM's 8 passes are of a quarter batch each, SAM's work in samples.
    assert summary["MicroBatchSAM"]["forward_batches_per_step"] == pytest.approx(2.0)
    assert summary["MicroBatchSAM"]["backward_batches_per_step"] == pytest.approx(2.0)


def test_grid_choice_and_edges():
    assert generalization.grid("SGD", (0.1, 0.3)) == [(None, None)]
    assert generalization.grid("ASAM", (0.1, 0.3)) == [(1.0, None), (3.0, None)]
    assert generalization.grid("WSAM", (0.3, 0.1)) == [(0.1, 0.8), (0.1, 0.9), (0.3, 0.8), (0.3, 0.9)]
    assert generalization.grid("GSAM", (0.1,), rhos=(0.5, 0.2), values=(0.0,)) == [(0.2, 0.0), (0.5, 0.0)]
    assert generalization.grid("BSAM", (0.1,)) == [(0.1, 0.2), (0.1, 0.5)]
    assert generalization.grid("MultiStepSAM", (0.3,)) == [(0.3, 0.5), (0.3, 1.0)]
    # NOTE: MSAM's radii, times AdamW's two peak lrs; plain AdamW has its lrs and no radius.
    assert generalization.grid("MSAM-AdamW", (0.1, 0.3)) == [(0.6, 1e-3), (0.6, 3e-3), (1.8, 1e-3),
                                                              (1.8, 3e-3)]
    assert generalization.grid("AdamW", (0.1, 0.3)) == [(None, 1e-3), (None, 3e-3)]
    # NOTE: equal means go to the earlier setting, the smaller radius.
    assert generalization.choose({(0.1, None): [0.5, 0.7], (0.3, None): [0.6, 0.6],
                                  (0.9, None): [0.1, 0.2]}) == (0.1, None)
    points = generalization.grid("SAM", (0.1, 0.3, 0.9))
    assert [generalization.grid_edge(rho, points) for rho in (0.1, 0.3, 0.9)] == ["lowest", None, "highest"]
    assert generalization.grid_edge(None, [(None, None)]) is None


def test_the_cnn_maps_digits_to_ten_logits():
    torch.manual_seed(0)
    assert generalization.make_model("cnn")(torch.randn(3, 64)).shape == (3, 10)


@pytest.mark.parametrize("argv", [["--rho", "SGD=0.1"], ["--rho", "SAM="], ["--param", "SAM=0.1"],
                                  ["--param", "GSAM=a"]])
def test_bad_grid_overrides_are_refused(argv):
    with pytest.raises(SystemExit):
        generalization.main([*argv, "--no-progress", "--no-figure"])


def test_the_new_variants_are_built_as_their_rows_say():
    """Multi-step SAM's step size, Sparse SAM's criterion and sparsity, micro-batch SAM's plain SAM, and
    bSAM's own lr (its swept value, also the peak of its cosine) and N."""
    from sam_kernels.optim import SAM, BayesianSAM, MultiStepSAM, SparseSAM

    def build(name, rho, param):
        model = generalization.make_model("mlp")
        return generalization.make_optimizer(name, model.parameters(), rho=rho, param=param, lr=0.05,
                                             total_steps=10, seed=0, backend="torch", num_data=320)

    multi = build("MultiStepSAM", 0.3, 1.0)
    assert isinstance(multi, MultiStepSAM)
    assert multi.policy.ascent_steps == 2 and multi.policy.step_size == 1.0 and multi.policy.projects
    for name, criterion in (("SparseSAM-F", "fisher"), ("SparseSAM-D", "dynamic")):
        sparse = build(name, 0.3, 0.9)
        assert isinstance(sparse, SparseSAM) and sparse.criterion == criterion and sparse.sparsity == 0.9
    assert type(build("MicroBatchSAM", 0.3, None)) is SAM
    assert generalization.VARIANTS["MicroBatchSAM"].micro_batches == 4
    bsam = build("BSAM", 0.9, 0.2)
    assert isinstance(bsam, BayesianSAM) and bsam.num_data == 320
    group = bsam.param_groups[0]
    assert (group["lr"], group["rho"], group["weight_decay"]) == (0.2, 0.9, generalization.WEIGHT_DECAY)
    assert generalization.VARIANTS["BSAM"].own_lr and not generalization.VARIANTS["SAM"].own_lr


def test_msam_adamw_is_momentum_sam_over_adamw_at_its_own_lr():
    """MSAM-AdamW: MomentumSAM over torch.optim.AdamW (its first moment the direction), the swept value
    its lr, AdamW's betas and decoupled weight decay; plain AdamW the same base optimizer, no radius."""
    from sam_kernels.optim import MomentumSAM

    def build(name, rho, param):
        model = generalization.make_model("mlp")
        return generalization.make_optimizer(name, model.parameters(), rho=rho, param=param, lr=0.05,
                                             total_steps=10, seed=0, backend="torch", num_data=320)

    msam = build("MSAM-AdamW", 1.8, 3e-3)
    assert isinstance(msam, MomentumSAM) and msam.policy.base_kind == "adam"
    assert msam.policy.direction_key == "exp_avg"
    group = msam.param_groups[0]
    assert (group["lr"], group["sam_rho"], group["betas"], group["weight_decay"]) == (
        3e-3, 1.8, generalization.ADAMW_BETAS, generalization.ADAMW_WEIGHT_DECAY)
    assert type(msam.base_optimizer) is torch.optim.AdamW
    adamw = build("AdamW", None, 1e-3)
    assert type(adamw) is torch.optim.AdamW
    group = adamw.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (
        1e-3, generalization.ADAMW_BETAS, generalization.ADAMW_WEIGHT_DECAY)
    for name in ("AdamW", "MSAM-AdamW"):
        assert generalization.VARIANTS[name].own_lr and generalization.VARIANTS[name].param == "lr"
    assert generalization.VARIANTS["MSAM-AdamW"].rho_scale == generalization.VARIANTS["MSAM"].rho_scale


def test_own_lr_rows_follow_the_cosine_from_their_own_peak_lr():
    training = generalization.with_label_noise(generalization.load_split(), 0.4, 0).training
    settings = [("BSAM", (0.9, 0.2)), ("MSAM-AdamW", (1.8, 3e-3)), ("AdamW", (None, 1e-3)),
                ("SAM", (0.3, None))]
    runs = generalization.train_runs("mlp", settings, training, seed=0, epochs=1, lr=0.05, backend="torch",
                                     progress=generalization.Progress(len(settings), enabled=False))
    steps = len(training.fit_y) // generalization.BATCH
    for run, peak in zip(runs, (0.2, 3e-3, 1e-3, 0.05)):
        assert run.lr == peak and run.steps == steps, run.name
        last = generalization.cosine_lr(peak, steps - 1, steps)
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(last), run.name
