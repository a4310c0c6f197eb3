"""Per-call cost of fxquant.ops against torch's quantized kernels and against the two registration styles.

    .venv/bin/python bench/bench_ops.py [--threads 1] [--repeat 7]

Prints medians over ``--repeat`` runs and ratios measured in the same run (absolute times on a shared machine
move; the ratios are what to read). Not a test.
"""
from __future__ import annotations

import argparse
import statistics
import timeit
import warnings
from typing import Callable

import torch

from fxquant import ops

warnings.filterwarnings("ignore")
F = torch.ops.fxquant


def _median_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def registration_overhead(repeat: int) -> None:
    """An identity op registered with Library("DEF") + impl versus torch.library.custom_op."""
    lib = torch.library.Library("fxquant_bench", "DEF")
    lib.define("ident(Tensor x, Tensor s, int a, ScalarType dtype) -> Tensor")
    lib.impl("ident", lambda x, s, a, dtype: x, "CompositeExplicitAutograd")

    @torch.library.custom_op("fxquant_bench2::ident", mutates_args=())
    def ident(x: torch.Tensor, s: torch.Tensor, a: int, dtype: torch.dtype) -> torch.Tensor:
        return x.clone()

    x, s = torch.randn(8), torch.tensor(1.0)
    lib_op = torch.ops.fxquant_bench.ident.default
    t_lib = _median_us(lambda: lib_op(x, s, 3, torch.uint8), 5000, repeat)
    t_custom = _median_us(lambda: ident(x, s, 3, torch.uint8), 5000, repeat)
    t_clone = _median_us(lambda: x.clone(), 5000, repeat)
    print(f"registration: Library+impl {t_lib:.1f} us, custom_op {t_custom:.1f} us (x.clone {t_clone:.1f} us); "
          f"custom_op / Library = {t_custom / t_lib:.1f}x")


def kernels(repeat: int) -> None:
    for n in (64, 4096, 1 << 20):
        x = torch.randn(n)
        q = torch.randint(0, 256, (n,), dtype=torch.uint8)
        xc = x.reshape(16, -1) if n >= 16 else x.reshape(1, -1)
        scales, zps = torch.rand(xc.shape[0]) * 0.1 + 0.01, torch.randint(0, 256, (xc.shape[0],))
        number = max(3, 200_000 // (n + 2000))
        rows = [
            ("quantize_per_tensor", lambda: ops.quantize_per_tensor(x, 0.02, 128, 0, 255, torch.uint8),
             lambda: torch.quantize_per_tensor(x, 0.02, 128, torch.quint8).int_repr()),
            ("dequantize_per_tensor", lambda: ops.dequantize_per_tensor(q, 0.02, 128, 0, 255, torch.uint8),
             lambda: torch._make_per_tensor_quantized_tensor(q, 0.02, 128).dequantize()),
            ("quantize_per_channel", lambda: ops.quantize_per_channel(xc, scales, zps, 0, 0, 255, torch.uint8),
             lambda: torch.quantize_per_channel(xc, scales.double(), zps, 0, torch.quint8).int_repr()),
            ("fake_quantize_per_tensor", lambda: ops.fake_quantize_per_tensor(x, 0.02, 128, 0, 255),
             lambda: torch.fake_quantize_per_tensor_affine(x, 0.02, 128, 0, 255)),
            ("choose_qparams_per_tensor", lambda: ops.choose_qparams_per_tensor(x, 0, 255, None, torch.uint8),
             lambda: torch._choose_qparams_per_tensor(x, False)),
        ]
        for name, ours, theirs in rows:
            t_ours, t_theirs = _median_us(ours, number, repeat), _median_us(theirs, number, repeat)
            print(f"n={n:>8} {name:27s} fxquant {t_ours:10.1f} us  torch {t_theirs:10.1f} us  "
                  f"ratio {t_ours / t_theirs:5.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registration_overhead(args.repeat)
    kernels(args.repeat)


if __name__ == "__main__":
    main()
