"""PyTorch Lightning drives SAM unchanged: automatic optimization passes a closure to optimizer.step
(SAM's closure style, run twice per step), manual optimization uses the two-call style; both train,
match eager SAM, and resume from a Lightning checkpoint exactly."""

from __future__ import annotations

import pytest
import torch
from eager_reference import ReferenceSAM, batch_loss, make_batches, make_mlp
from tolerance import assert_bitwise_equal, assert_close
from variant_reference import EagerMicroBatchSAM

from sam_kernels.optim import SAM

lightning = pytest.importorskip("lightning.pytorch")

STEPS = 6


class Classifier(lightning.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.net = make_mlp()
        self.automatic_optimization = not manual
        self.closure_calls = 0
        self.losses: list[float] = []
        self.seen: list = []  # the batches of the steps, once each

    def training_step(self, batch, batch_index):
        x, y = batch
        if self.automatic_optimization:
            if self.closure_calls % 2 == 0:
                self.seen.append(batch)
            self.closure_calls += 1  # Lightning's closure runs training_step
            loss = batch_loss(self.net, x, y)
            self.losses.append(float(loss.detach()))
            return loss
        # NOTE: manual optimization goes through the LightningOptimizer's step (which counts the step)
        # with a closure, SAM's closure style; the closure runs at w and at w + e.
        optimizer = self.optimizers()
        self.seen.append(batch)

        def closure():
            optimizer.zero_grad()
            loss = batch_loss(self.net, x, y)
            self.manual_backward(loss)
            return loss

        loss = optimizer.step(closure=closure)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def trainer(tmp_path, steps, **kwargs):
    return lightning.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path), **kwargs)


def eager_run(batches) -> list[torch.Tensor]:
    model = make_mlp()
    ref = ReferenceSAM.of_model(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    for x, y in batches:
        ref.step([(x, y)])
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_trains_like_eager_sam(tmp_path, manual):
    batches = make_batches(STEPS, size=16)
    module = Classifier(manual)
    trainer(tmp_path, STEPS, enable_checkpointing=False).fit(module, loader(batches))
    if not manual:
        assert module.closure_calls == 2 * STEPS  # the closure runs at w and at w + e
    assert_close([p.detach() for p in module.net.parameters()], eager_run(batches), scale=10)


def test_lightning_loss_falls(tmp_path):
    batches = make_batches(1, size=32) * 30
    module = Classifier()
    trainer(tmp_path, len(batches), enable_checkpointing=False).fit(module, loader(batches))
    at_w = module.losses[0::2]  # the closure's first call of each step
    assert sum(at_w[-3:]) < 0.7 * sum(at_w[:3])


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_checkpoint_resumes_exactly(tmp_path, manual):
    """Three steps, a Lightning checkpoint, three more steps in a new Trainer and module resumed from it:
    the result equals SAM loaded from the same checkpoint by hand and stepped on the batches the resumed
    run drew, bit for bit (so Lightning restores SAM's state, seed and step included). The batches are
    recorded because Lightning itself replays part of an epoch on such a resume."""
    batches = make_batches(3, size=16)
    first = trainer(tmp_path / "first", 3, enable_checkpointing=False)
    first.fit(Classifier(manual), loader(batches))
    path = tmp_path / "step3.ckpt"
    first.save_checkpoint(path)
    resumed = Classifier(manual)
    trainer(tmp_path / "resumed", 6, enable_checkpointing=False).fit(resumed, loader(batches),
                                                                     ckpt_path=str(path))
    assert len(resumed.seen) == 3
    checkpoint = torch.load(path, weights_only=False)
    by_hand = Classifier(manual)
    by_hand.load_state_dict(checkpoint["state_dict"])
    sam = by_hand.configure_optimizers()
    sam.load_state_dict(checkpoint["optimizer_states"][0])
    assert sam.state_dict()["sam"]["step"] == 3
    for x, y in resumed.seen:
        batch_loss(by_hand.net, x, y).backward()
        sam.first_step(zero_grad=True)
        batch_loss(by_hand.net, x, y).backward()
        sam.second_step(zero_grad=True)
    assert_bitwise_equal([p.detach() for p in resumed.net.parameters()],
                         [p.detach() for p in by_hand.net.parameters()])


def test_accumulate_grad_batches_is_micro_batch_sam(tmp_path):
    """accumulate_grad_batches=4 with the micro-batch strategy: 2 closure calls per micro-batch, and the
    steps of eager micro-batch SAM (Lightning divides each loss by 4); plain Lightning accumulation
    would give one SAM step per micro-batch's pair of passes instead."""
    from sam_kernels.integrations.lightning import MicroBatchSingleDeviceStrategy

    micro = make_batches(8, size=4)
    module = Classifier()
    trainer(tmp_path, 2, enable_checkpointing=False, accumulate_grad_batches=4,
            strategy=MicroBatchSingleDeviceStrategy("cpu")).fit(module, loader(micro))
    assert module.closure_calls == 2 * len(micro)
    model = make_mlp()
    reference = EagerMicroBatchSAM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    for step in range(2):
        reference.step(model, micro[4 * step:4 * step + 4], scale=0.25)
    assert_close([p.detach() for p in module.net.parameters()], [p.detach() for p in model.parameters()],
                 scale=10)
