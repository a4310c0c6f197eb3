"""Every native element-wise kernel gives the same bytes on two threads as on one (their parallel loops split the
work in blocks; a serial call takes a separate loop without an OpenMP region): lookup, per-channel affine, add,
gate product, 8-bit max pool, quantize (plain and into channels-last) and dequantize, at sizes above each
kernel's parallel threshold, contiguous and channels-last."""
from __future__ import annotations

import pytest
import torch

from fxquant.kernels import native

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


def _bytes(shape: tuple, seed: int, layout: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).contiguous(memory_format=layout)


def _on(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_two_threads_equal_one(layout: torch.memory_format) -> None:
    big = _bytes((2, 64, 57, 45), 1, layout)  # 328k elements: above every kernel's parallel threshold
    other = _bytes((2, 64, 57, 45), 2, layout)
    gate = _bytes((2, 64, 1, 1), 3)
    table = _bytes((256,), 4)
    a, b = torch.rand(64) * 0.5, torch.rand(64) * 40
    floats = torch.randn(2, 64, 57, 45).contiguous(memory_format=layout) * 60

    def lookup() -> torch.Tensor:
        out = torch.empty_like(big)
        native.lookup(big, table, out)
        return out

    kernels = {
        "lookup": lookup,
        "affine": lambda: native.channel_affine(big, a, b, 3, 250),
        "add": lambda: native.add(big, other, 0.7, 0.4, -11.0, 0, 255),
        "gate": lambda: native.mul_gate(big, gate, 0.003, 5, 9, 17.0, 0, 255),
        "quantize": lambda: native.quantize(floats, 0.9, 100, 0, 255, torch.uint8),
        "quantize_cl": lambda: native.quantize(floats.contiguous(), 0.9, 100, 0, 255, torch.uint8, True),
        "dequantize": lambda: native.dequantize(big, 0.013, 77),
    }
    if layout == torch.channels_last:
        kernels["max_pool"] = lambda: native.max_pool2d(big, (3, 3), (2, 2), (1, 1), (1, 1), False)
    for name, fn in kernels.items():
        one, two = _on(1, fn), _on(2, fn)
        assert one is not None and torch.equal(one, two), name
        assert one.stride() == two.stride(), name
