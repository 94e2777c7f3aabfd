"""The launchers' shared argument checks (kernels/checks.py): what each accepts and what it names."""

import pytest
import torch

from loraplex.kernels.checks import (
    check_block,
    check_device,
    check_dims,
    check_dtype,
    check_float_dtype,
    check_same_dtype,
    check_unit_stride,
)


@pytest.mark.parametrize("value", [16, 32, 128])
def test_block_accepts_powers_of_two_from_16(value: int) -> None:
    check_block("block_m", value)


@pytest.mark.parametrize("value", [0, 8, 24, 48])
def test_block_rejects_others(value: int) -> None:
    with pytest.raises(ValueError, match=f"block_m must be a power of two >= 16, got {value}"):
        check_block("block_m", value)


def test_unit_stride_along_the_named_axis() -> None:
    wide = torch.zeros(4, 10)
    check_unit_stride("x", wide[:, 2:6], 1, "in_features")  # a strided view of rows is fine
    with pytest.raises(ValueError, match="x must be contiguous along in_features"):
        check_unit_stride("x", wide.t()[:4], 1, "in_features")
    # One column has no step along it: any stride does.
    check_unit_stride("x", wide.t()[:4, :1], 1, "in_features")


def test_dims_count_the_layout() -> None:
    check_dims("x", torch.zeros(2, 3), "[num_tokens, in_features]")
    with pytest.raises(ValueError, match=r"x must be \[num_tokens, in_features\], got \(2,\)"):
        check_dims("x", torch.zeros(2), "[num_tokens, in_features]")


def test_dtypes() -> None:
    check_float_dtype("x", torch.zeros(1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x dtype torch.float64 not supported"):
        check_float_dtype("x", torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="lora_a dtype torch.float16 must match x dtype torch.float32"):
        check_same_dtype("lora_a", torch.zeros(1, dtype=torch.float16), "x", torch.zeros(1))
    with pytest.raises(ValueError, match=r"h must be float32 \(lora_shrink's output\), got torch.float16"):
        check_dtype("h", torch.zeros(1, dtype=torch.float16), (torch.float32,), " (lora_shrink's output)")
    with pytest.raises(ValueError, match="ranks must be int32 or int64, got torch.float32"):
        check_dtype("ranks", torch.zeros(1), (torch.int32, torch.int64))


def test_device_names_the_reference_argument() -> None:
    cpu = torch.device("cpu")
    check_device("h", torch.zeros(1), cpu)
    with pytest.raises(ValueError, match="h is on meta, expected y's device cpu"):
        check_device("h", torch.zeros(1, device="meta"), cpu, "y")
    with pytest.raises(ValueError, match="ranks is on meta, expected cpu"):
        check_device("ranks", torch.zeros(1, device="meta"), cpu)
