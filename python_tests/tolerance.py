"""The one place for test tolerances: exact where the contract is exact, relative where math reorders."""

import torch

#: (rtol, atol) for results computed in fp32 and stored in each dtype. Low-precision entries allow one unit
#: in the last place, since backends may round the same fp32 value differently when storing it.
TOLERANCES = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-4),
}


def assert_close(actual, expected, dtype=None, scale: float = 1.0, msg: str = "") -> None:
    """Relative comparison at ``dtype``'s tolerance (the tensors' dtype by default), times ``scale``."""
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected), msg
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, dtype, scale, f"{msg} [tensor {i}]")
        return
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale,
                               msg=lambda m: f"{msg}\n{m}")


def assert_bitwise_equal(actual, expected, msg: str = "") -> None:
    """Exact equality, bit for bit (NaN payloads included), for restores and masks."""
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected), msg
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bitwise_equal(a, e, f"{msg} [tensor {i}]")
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, msg
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    assert torch.equal(actual.contiguous().view(bits), expected.contiguous().view(bits)), msg
