"""sam_kernels.integrations.huggingface.SAMTrainer with the real transformers.Trainer on a tiny model
built from a config (no download): two passes per step, the same steps as eager SAM, the loss falls,
and a checkpoint resumes exactly."""

from __future__ import annotations

import pytest
import torch
from eager_reference import ReferenceSAM
from tolerance import assert_bitwise_equal, assert_close
from variant_reference import EagerMicroBatchSAM

from sam_kernels.optim import SAM, Interval

transformers = pytest.importorskip("transformers")
from sam_kernels.integrations.huggingface import SAMTrainer  # noqa: E402

VOCAB, LENGTH = 32, 8


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def dataset(count: int = 16):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (count, LENGTH), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(tmp_path, steps, **kwargs):
    options = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                   learning_rate=0.05, lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
                   use_cpu=True, seed=0, data_seed=0, logging_steps=1, save_strategy="no",
                   dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**options, **kwargs})


def sam_for(model, **options):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, **options)


def counting_forwards(model):
    """The input ids of every forward call of ``model``."""
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].clone()),
                                    with_kwargs=True)
    return calls


def trainer_loss(model, x, y):
    """The Trainer's causal-LM loss: summed over the label tokens, divided by their count in the batch
    (``num_items_in_batch``), all of them here."""
    return model(input_ids=x, labels=y, num_items_in_batch=torch.tensor(y.numel())).loss


def test_sam_trainer_runs_two_passes_like_eager_sam(tmp_path):
    model = tiny_model()
    forwards = counting_forwards(model)
    SAMTrainer(model=model, args=arguments(tmp_path, 4), train_dataset=dataset(),
               optimizers=(sam_for(model), None)).train()
    assert len(forwards) == 8
    assert all(torch.equal(a, b) for a, b in zip(forwards[0::2], forwards[1::2], strict=True))

    expected = tiny_model()
    ref = ReferenceSAM.of_model(expected, torch.optim.SGD(expected.parameters(), lr=0.05, momentum=0.9),
                            rho=0.05, loss=trainer_loss)
    for batch in forwards[0::2]:  # the batches the Trainer drew, in its order
        ref.step([(batch, batch)])
    assert_close([p.detach() for p in model.parameters()], [p.detach() for p in expected.parameters()],
                 scale=50)


def test_sam_trainer_loss_falls_and_schedules_skip_passes(tmp_path):
    model = tiny_model()
    forwards = counting_forwards(model)
    trainer = SAMTrainer(model=model, args=arguments(tmp_path, 20), train_dataset=dataset(8),
                         optimizers=(sam_for(model, schedule=Interval(2)), None))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    assert len(forwards) == 30  # 20 steps, 10 of them SAM steps


def test_sam_trainer_resumes_from_its_checkpoint(tmp_path):
    def run(output, steps, resume=None):
        model = tiny_model()
        args = arguments(output, steps, save_strategy="steps", save_steps=3)
        trainer = SAMTrainer(model=model, args=args, train_dataset=dataset(),
                             optimizers=(sam_for(model), None))
        trainer.train(resume_from_checkpoint=resume)
        return [p.detach().clone() for p in model.parameters()]

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "first", 3)
    resumed = run(tmp_path / "first", 6, resume=str(tmp_path / "first" / "checkpoint-3"))
    assert_bitwise_equal(resumed, straight)


def test_sam_trainer_accumulation_is_micro_batch_sam(tmp_path):
    """gradient_accumulation_steps=4: exactly 2 passes per micro-batch, and the steps of eager micro-batch
    SAM (each micro-batch its own ascent, the descent on the sum of their SAM gradients) over the
    micro-batches the Trainer drew."""
    model = tiny_model()
    forwards = counting_forwards(model)
    SAMTrainer(model=model, args=arguments(tmp_path, 2, gradient_accumulation_steps=4),
               train_dataset=dataset(32), optimizers=(sam_for(model), None)).train()
    assert len(forwards) == 2 * 4 * 2
    assert all(torch.equal(a, b) for a, b in zip(forwards[0::2], forwards[1::2], strict=True))

    expected = tiny_model()
    items = torch.tensor(4 * forwards[0].numel())  # the Trainer's count: the label tokens of a whole step
    ref = EagerMicroBatchSAM(expected, torch.optim.SGD(expected.parameters(), lr=0.05, momentum=0.9),
                             rho=0.05, loss=lambda m, x, y: m(input_ids=x, labels=y,
                                                              num_items_in_batch=items).loss)
    firsts = forwards[0::2]
    for step in range(2):
        ref.step(expected, [(batch, batch) for batch in firsts[4 * step:4 * step + 4]])
    assert_close([p.detach() for p in model.parameters()], [p.detach() for p in expected.parameters()],
                 scale=50)


def test_sam_trainer_refuses_other_optimizers(tmp_path):
    model = tiny_model()
    with pytest.raises(TypeError, match="SAM-family optimizer"):
        SAMTrainer(model=model, args=arguments(tmp_path, 1), train_dataset=dataset(),
                   optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None)).train()
