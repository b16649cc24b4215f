"""Lightning with fp16 mixed precision: Lightning's own plugin cannot drive a two-pass optimizer (it runs
the closure once, then scaler.step without it) and SAM says so with the fix; the package's
SAMMixedPrecision plugin trains with two passes per step, matches eager SAM under the same fp16 autocast
and loss scale, and skips a step whose gradient overflowed with the weights restored.

On a CPU Lightning turns precision="16-mixed" into bf16, so the plugin is built here with a CPU
GradScaler and fp16 autocast: the code path a GPU run takes, on the CPU."""

from __future__ import annotations

import pytest
import torch
from eager_reference import ReferenceSAM, batch_loss, make_batches, make_mlp
from tolerance import assert_bitwise_equal, assert_close

from sam_kernels.optim import SAM

lightning = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from sam_kernels.integrations.lightning import SAMMixedPrecision  # noqa: E402

STEPS = 4
SCALE = 2.0**10
OPTIONS = {"lr": 0.1, "momentum": 0.9}


class Classifier(lightning.LightningModule):
    def __init__(self, corrupt_step: int | None = None) -> None:
        super().__init__()
        self.net = make_mlp()
        self.closure_calls = 0
        self.corrupt_step = corrupt_step
        self.weights_before: list[list[torch.Tensor]] = []

    def training_step(self, batch, batch_index):
        if self.closure_calls % 2 == 0:
            self.weights_before.append([p.detach().clone() for p in self.net.parameters()])
        self.closure_calls += 1
        x, y = batch
        loss = batch_loss(self.net, x, y)
        if batch_index == self.corrupt_step and self.closure_calls % 2 == 1:
            loss = loss * float("inf")  # the first pass overflows
        return loss

    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=0.05, **OPTIONS)


def fit(tmp_path, module, plugin, steps=STEPS):
    batches = make_batches(steps, size=16)
    trainer = lightning.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                enable_checkpointing=False, default_root_dir=str(tmp_path),
                                plugins=[plugin])
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False))
    return batches


def fp16_plugin(cls=SAMMixedPrecision):
    return cls("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=SCALE))


def test_sam_mixed_precision_trains_like_eager_sam_under_the_same_fp16_scaling(tmp_path):
    module = Classifier()
    plugin = fp16_plugin()
    batches = fit(tmp_path, module, plugin)
    assert module.closure_calls == 2 * STEPS
    eager = make_mlp()
    ref = ReferenceSAM.of_model(eager, torch.optim.SGD(eager.parameters(), **OPTIONS), rho=0.05)
    for x, y in batches:
        assert not ref.step([(x, y)], scale=SCALE, autocast=lambda: torch.autocast("cpu", torch.float16))
    for a, b in zip(module.net.parameters(), eager.parameters(), strict=True):
        assert_close(a.detach(), b.detach(), scale=10)
    assert plugin.scaler.get_scale() == SCALE  # no overflow, no growth yet (2000-step interval)


def test_an_overflowing_step_is_skipped_with_the_weights_restored(tmp_path):
    module = Classifier(corrupt_step=1)
    plugin = fp16_plugin()
    fit(tmp_path, module, plugin, steps=3)
    before_skipped, after_skipped = module.weights_before[1], module.weights_before[2]
    assert_bitwise_equal(after_skipped, before_skipped)
    assert plugin.scaler.get_scale() == SCALE / 2  # the scaler backed off


def test_lightning_own_fp16_plugin_is_refused_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match="SAMMixedPrecision"):
        fit(tmp_path, Classifier(), fp16_plugin(MixedPrecision), steps=1)
