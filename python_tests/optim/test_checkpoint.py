"""Save, load and continue gives the trajectory of an uninterrupted run, bit for bit on CPU."""

from __future__ import annotations

import io

import torch
from cases import on_backends
from eager_reference import assert_models_equal, make_batches, make_model

from sam_kernels.optim import ESAM, SAM, sample_losses_closure

from .test_esam import per_sample_cross_entropy
from .test_sam import fit

CASES = {
    "sam_sgd": lambda params, backend, seed: SAM(params, torch.optim.SGD, lr=0.05, momentum=0.9,
                                                 dampening=0.1, backend=backend, seed=seed),
    "ssam_adamw": lambda params, backend, seed: SAM(params, torch.optim.AdamW, lr=0.01, amsgrad=True,
                                                    renormalize=True, backend=backend, seed=seed),
    "asam_rmsprop": lambda params, backend, seed: SAM(params, torch.optim.RMSprop, lr=0.01,
                                                      momentum=0.5, adaptive=True, rho=0.5,
                                                      backend=backend, seed=seed),
    "esam_tensor_sds": lambda params, backend, seed: ESAM(params, torch.optim.SGD, lr=0.05,
                                                          momentum=0.9, beta=0.5, gamma=0.5,
                                                          backend=backend, seed=seed),
    "esam_element": lambda params, backend, seed: ESAM(params, torch.optim.AdamW, lr=0.01, beta=0.7,
                                                       gamma=1.0, swp="element", backend=backend,
                                                       seed=seed),
}


def train(optimizer, model, batches) -> None:
    if isinstance(optimizer, ESAM) and optimizer.gamma < 1:
        for x, y in batches:
            optimizer.sds_step(sample_losses_closure(model, x, y, per_sample_cross_entropy))
    else:
        fit(model, optimizer, batches)


# On Triton: both fused descents and the elementwise mask (drawn in the kernel from the restored seed and
# step); the RMSprop and tensor-SDS cases differ on the host only.
@on_backends("case", list(CASES), triton=["sam_sgd", "ssam_adamw", "esam_element"])
def test_resume_equals_uninterrupted_run(case, backend):
    make_optimizer = CASES[case]
    batches = make_batches(6)

    straight = make_model()
    straight_optimizer = make_optimizer(straight.parameters(), backend, 1234)
    train(straight_optimizer, straight, batches)

    first = make_model()
    first_optimizer = make_optimizer(first.parameters(), backend, 1234)
    train(first_optimizer, first, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = make_model(seed=99)  # different weights and seed: everything must come from the file
    resumed_optimizer = make_optimizer(resumed.parameters(), backend, 5)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    if isinstance(resumed_optimizer, ESAM):
        assert ([p.requires_grad for p in resumed.parameters()]
                == [p.requires_grad for p in first.parameters()])
    train(resumed_optimizer, resumed, batches[3:])

    assert_models_equal(resumed, straight)
    expected, actual = straight_optimizer.state_dict(), resumed_optimizer.state_dict()
    assert actual["sam"] == expected["sam"] == {"seed": 1234, "step": 6}
    for index, entry in expected["state"].items():
        for key, value in entry.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)


def test_state_dict_is_the_base_optimizers_plus_sam_entry():
    model = make_model()
    sam = SAM(model.parameters(), torch.optim.AdamW, lr=0.01, backend="torch", seed=3)
    fit(model, sam, make_batches(2))
    state = sam.state_dict()
    assert set(state) == {"state", "param_groups", "sam"}
    plain = torch.optim.AdamW(make_model().parameters(), lr=0.01)
    plain.load_state_dict({k: v for k, v in state.items() if k != "sam"})  # torch can read it
    assert plain.state_dict()["state"][0]["exp_avg"].shape == state["state"][0]["exp_avg"].shape
    fresh = SAM(model.parameters(), torch.optim.AdamW, lr=0.01, backend="torch")
    fresh.load_state_dict(plain.state_dict())  # a plain torch checkpoint loads too
    assert fresh.param_groups[0]["sam_rho"] == 0.05
