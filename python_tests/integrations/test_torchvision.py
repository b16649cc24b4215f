"""A real torchvision model in channels_last, the usual GPU recipe for CNNs: SAM trains it in the kernels
with no copies (weights, gradients, backups and state keep the layout) and follows the eager SAM over
torch.optim on a copy of the same model."""

from __future__ import annotations

import pytest
import torch
from eager_reference import ReferenceSAM, assert_models_close, batch_loss, clone_model, eager_sam_step

from sam_kernels.optim import SAM, freeze_bn_stats

torchvision = pytest.importorskip("torchvision")

#: One step: later steps of a ResNet at these batch sizes amplify the last-bit differences of the two
#: implementations' norms (fp32 sums in different orders) chaotically, in either layout (measured: 1e-7
#: to 1e-4 relative after one step, up to 1e-2 after two); the layout itself is checked bit for bit at
#: the op level (test_ops.py).
STEPS = 1


def batches(count: int):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 3, 64, 64, generator=generator).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (8,), generator=generator)) for _ in range(count)]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resnet18_channels_last_matches_eager_sam(base):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
    reference_model = clone_model(model)
    base_cls, options = {"sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}),
                         "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.05})}[base]
    sam = SAM(model.parameters(), base_cls, rho=0.05, **options)
    reference = ReferenceSAM.of_model(reference_model, base_cls(reference_model.parameters(), **options),
                                  rho=0.05)
    assert sam.uses_fused_step
    for x, y in batches(STEPS):
        batch_loss(model, x, y).backward()
        sam.first_step(zero_grad=True)
        with freeze_bn_stats(model):
            batch_loss(model, x, y).backward()
        sam.second_step(zero_grad=True)
        eager_sam_step(reference, reference_model, x, y)
    assert_models_close(model, reference_model, rtol=1e-4, atol=1e-5)
    conv = model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for value in sam.state[conv].values():
        if value.dim() == 4:
            assert value.stride() == conv.stride()
    assert sam._backups[conv].stride() == conv.stride()
