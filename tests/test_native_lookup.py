"""The native 256-entry byte table (fxquant.kernels.native.lookup) behind uint8.lookup -- every LookupTable
(activations folded into tables, requantizations): equal to indexing the table for uint8 and int8 input, uint8 and
int8 tables, every length around the 32-byte steps, contiguous and channels-last images (layout kept); strided input
and tables of wider dtypes keep aten's gather; bad arguments raise."""
from __future__ import annotations

import pytest
import torch

from fxquant.kernels import native, uint8

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


def _values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (n,), dtype=dtype, generator=torch.Generator().manual_seed(seed))
    every = torch.arange(256, dtype=torch.int32) + (0 if dtype == torch.uint8 else -128)
    x[:min(n, 256)] = every[:min(n, 256)].to(dtype)  # each index once where the length allows
    return x


def _table(dtype: torch.dtype, seed: int) -> torch.Tensor:
    lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
    return torch.randint(lo, hi, (256,), dtype=dtype, generator=torch.Generator().manual_seed(100 + seed))


@needs_native
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.int8])
@pytest.mark.parametrize("table_dtype", [torch.uint8, torch.int8])
def test_equals_indexing_at_every_length(in_dtype: torch.dtype, table_dtype: torch.dtype) -> None:
    table = _table(table_dtype, 0)
    for n in list(range(0, 70)) + [255, 256, 257, 4095, 4096, 4097, 4096 * 3 + 31, 100_003]:
        x = _values(in_dtype, n, n)
        expected = table[x.long() + (128 if in_dtype == torch.int8 else 0)]
        out = torch.empty(n, dtype=table_dtype)
        native.lookup(x, table, out)
        assert torch.equal(out, expected), n


@needs_native
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_images_keep_their_layout(layout: torch.memory_format) -> None:
    table = _table(torch.uint8, 1)
    x = _values(torch.uint8, 2 * 24 * 9 * 7, 3).reshape(2, 24, 9, 7).contiguous(memory_format=layout)
    got = uint8.lookup(x, table)
    assert torch.equal(got, table[x.long()]) and got.is_contiguous(memory_format=layout)


def test_strided_input_and_wide_tables_keep_the_gather() -> None:
    x = _values(torch.uint8, 2 * 3 * 8 * 8, 4).reshape(2, 3, 8, 8)
    strided = x.transpose(2, 3)
    table = _table(torch.uint8, 2)
    assert torch.equal(uint8.lookup(strided, table), table[strided.long()])
    wide = torch.linspace(-1, 1, 256)
    assert torch.equal(uint8.lookup(x, wide), wide[x.long()])


@needs_native
def test_bad_arguments_raise() -> None:
    x, table = torch.zeros(8, dtype=torch.uint8), torch.zeros(256, dtype=torch.uint8)
    with pytest.raises(ValueError, match="256-entry"):
        native.lookup(x, torch.zeros(128, dtype=torch.uint8), torch.empty(8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape and strides"):
        native.lookup(x, table, torch.empty(9, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape and strides"):  # an image and an output of another layout
        image = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
        native.lookup(image, table, torch.empty_like(image, memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="dense"):
        native.lookup(torch.zeros(8, 2, dtype=torch.uint8).t(), table, torch.empty(2, 8, dtype=torch.uint8).t())
    with pytest.raises(ValueError):
        native.lookup(x, torch.zeros(256), torch.empty(8))
