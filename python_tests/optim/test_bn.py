"""freeze_bn_stats: batch statistics as usual, running statistics untouched bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sam_kernels.optim import freeze_bn_stats


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.BatchNorm1d(6, momentum=None))


@pytest.mark.parametrize("scope", ["model", "global"])
def test_frozen_forward_normalizes_as_usual_and_updates_nothing(scope):
    model = bn_model()
    x = torch.randn(8, 4)
    before = {name: b.clone() for name, b in model.named_buffers()}
    expected = bn_model()(x)
    with freeze_bn_stats(model if scope == "model" else None):
        output = model(x)
    assert torch.equal(output, expected)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert all(layer.track_running_stats for layer in model.modules() if isinstance(layer, nn.BatchNorm1d))
    model(x)  # unfrozen again: the statistics move
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_restored_when_the_block_raises():
    model = bn_model()
    with pytest.raises(RuntimeError, match="boom"), freeze_bn_stats():
        model(torch.randn(8, 4))
        raise RuntimeError("boom")
    assert all(layer.track_running_stats for layer in model.modules() if isinstance(layer, nn.BatchNorm1d))


def test_eval_mode_layers_are_left_alone():
    model = bn_model().eval()
    x = torch.randn(8, 4)
    expected = model(x)
    with freeze_bn_stats(model):
        assert torch.equal(model(x), expected)
