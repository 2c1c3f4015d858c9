"""dtype 'auto': bf16 autocast where the hardware runs bf16 natively, fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from picollm.device import autocast, native_bf16, resolve_dtype
from picollm.errors import UserError


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_auto_follows_the_cpus_bf16_support(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert native_bf16("cpu") is (expected == "bf16")
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    with autocast(torch.device("cpu"), "auto"):
        out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert out.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def test_explicit_dtypes_pass_through_and_bad_ones_are_named():
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_dtype(name, "cpu") == name
    with pytest.raises(UserError, match="dtype 'int8': use one of auto, fp32, bf16, fp16"):
        resolve_dtype("int8", "cpu")


def test_auto_is_fp32_where_bf16_is_not_native():
    assert resolve_dtype("auto", "meta") == "fp32"
