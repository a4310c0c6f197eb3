"""The native 8-bit channels-last max pool (fxquant.kernels.native.max_pool2d) behind uint8.max_pool2d: equal to
aten's pool (computed on int32) for every geometry, uint8 and int8, channels-last out; aten's kernel (and its
errors) for arguments it refuses and without the native library."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fxquant.kernels import native, uint8

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


def _image(dtype: torch.dtype, shape: tuple, seed: int = 0) -> torch.Tensor:
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)


@needs_native
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_equals_aten_for_every_geometry(dtype: torch.dtype) -> None:
    cases = 0
    for (h, w), c, k, s, p, d, ceil in itertools.product(((7, 9), (16, 16), (5, 5)), (3, 32, 45, 64),
                                                         (1, 2, 3, (3, 2)), (None, 1, 2, (2, 1)), (0, 1), (1, 2),
                                                         (False, True)):
        if p > min(k if isinstance(k, tuple) else (k, k)) // 2:
            continue
        x = _image(dtype, (2, c, h, w), cases)
        ref = F.max_pool2d(x.to(torch.int32), k, s, p, d, ceil).to(dtype)
        got = uint8.max_pool2d(x, k, s, p, d, ceil)
        assert torch.equal(got, ref), (h, w, c, k, s, p, d, ceil)
        assert got.is_contiguous(memory_format=torch.channels_last)
        cases += 1
    assert cases > 500


@needs_native
def test_keyword_and_default_arguments() -> None:
    x = _image(torch.uint8, (1, 8, 6, 6))
    assert torch.equal(uint8.max_pool2d(x, kernel_size=3, stride=2, padding=1),
                       F.max_pool2d(x.int(), 3, 2, 1).byte())
    assert torch.equal(uint8.max_pool2d(x, [2, 2], [], 0, 1), F.max_pool2d(x.int(), 2).byte())
    assert torch.equal(uint8.max_pool2d(x, (2,)), F.max_pool2d(x.int(), 2).byte())


@needs_native
def test_the_native_kernel_runs_and_bad_arguments_reach_aten(monkeypatch) -> None:
    calls = []
    real = native.max_pool2d
    monkeypatch.setattr(native, "max_pool2d", lambda *a: calls.append(a) or real(*a))
    x = _image(torch.uint8, (2, 16, 9, 9))
    uint8.max_pool2d(x, 3, 2, 1)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        uint8.max_pool2d(x, 2, 2, 2)


def test_without_the_native_library_the_result_is_the_same(monkeypatch) -> None:
    x = _image(torch.uint8, (2, 24, 11, 11))
    with_native = uint8.max_pool2d(x, 3, 2, 1, 1, True)
    monkeypatch.setattr(native, "available", lambda: False)
    assert torch.equal(uint8.max_pool2d(x, 3, 2, 1, 1, True), with_native)
    assert torch.equal(with_native, F.max_pool2d(x.int(), 3, 2, 1, 1, True).byte())
