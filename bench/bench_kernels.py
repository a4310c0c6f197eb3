"""Micro-benchmarks of the x86 CPU int8 kernels against fp32 in the same run (one thread, medians).

    .venv/bin/python bench/bench_kernels.py [--repeats 30] [--only linear,conv,dynamic,weight_only,embedding]

Prints one line per (op, shape): the fp32 time and each int8 candidate's time as a speedup (fp32 / candidate;
> 1 means int8 is faster). Figures are noisy on a shared machine; the rule in fxquant/kernels/x86.py is drawn
from them. Inputs use the reduce-range activation range (0..127) so that onednn's u8*s8 kernel is exact on
CPUs without VNNI (see x86.py).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

ONEDNN = torch.ops.onednn


def median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def report(op: str, shape: str, fp32_us: float, candidates: dict[str, float]) -> None:
    parts = "  ".join(f"{name} {fp32_us / us:5.2f}x" for name, us in candidates.items())
    print(f"{op:12s} {shape:28s} fp32 {fp32_us:9.1f} us   {parts}", flush=True)


def _qweight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01 + 1e-3


def bench_linear(repeats: int) -> None:
    for m, k, n in [(1, 512, 512), (4, 512, 512), (16, 512, 512), (64, 512, 512), (128, 768, 768),
                    (128, 768, 3072), (512, 1024, 1024)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        qw, ws = _qweight(n, k)
        qx = torch.randint(0, 128, (m, k), dtype=torch.uint8)
        packed = ONEDNN.qlinear_prepack(qw, [m, k])
        wzp, bias = torch.zeros(n, dtype=torch.long), torch.randn(n)
        wf = qw.float() * ws[:, None]
        fp32 = median_us(lambda: F.linear(x, w, bias), repeats)
        cands = {
            "onednn_u8": median_us(lambda: ONEDNN.qlinear_pointwise(qx, 0.02, 64, packed, ws, wzp, bias, 0.05, 64,
                                                                    None, "none", [], ""), repeats),
            "onednn_f32": median_us(lambda: ONEDNN.qlinear_pointwise(qx, 0.02, 64, packed, ws, wzp, bias, 1.0, 0,
                                                                     torch.float32, "none", [], ""), repeats),
            "fallback": median_us(lambda: ((F.linear((qx.float() - 64) * 0.02, wf, bias) * 20).round() + 64)
                                  .clamp(0, 255).to(torch.uint8), repeats),
        }
        report("linear", f"M={m} K={k} N={n}", fp32, cands)


def _dynamic_onednn(x: torch.Tensor, packed: torch.Tensor, ws: torch.Tensor, wzp: torch.Tensor,
                    bias: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(x)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / 127).clamp(min=1e-8)
    zp = (-lo / scale).round().clamp(0, 127)
    qx = (x / scale + zp).round().clamp(0, 127).to(torch.uint8)
    return ONEDNN.qlinear_pointwise.tensor(qx, scale, zp.long(), packed, ws, wzp, bias, 1.0, 0, torch.float32,
                                           "none", [], "")


def bench_dynamic(repeats: int) -> None:
    for m, k, n in [(1, 512, 512), (16, 512, 512), (128, 768, 768), (128, 768, 3072)]:
        x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        qw, ws = _qweight(n, k)
        packed, wzp = ONEDNN.qlinear_prepack(qw, [m, k]), torch.zeros(n, dtype=torch.long)
        fp32 = median_us(lambda: F.linear(x, w, bias), repeats)
        report("dynamic", f"M={m} K={k} N={n}", fp32,
               {"onednn": median_us(lambda: _dynamic_onednn(x, packed, ws, wzp, bias), repeats)})


def bench_weight_only(repeats: int) -> None:
    for m, k, n in [(1, 1024, 1024), (1, 4096, 4096), (16, 1024, 1024)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        qw, ws = _qweight(n, k)
        fp32 = median_us(lambda: F.linear(x, w), repeats)
        report("weight_only", f"M={m} K={k} N={n}", fp32, {
            "dequant+mm": median_us(lambda: F.linear(x, qw.float() * ws[:, None]), repeats),
            "int8pack_mm": median_us(lambda: torch.ops.aten._weight_int8pack_mm(x, qw, ws), max(3, repeats // 5)),
        })


def bench_conv(repeats: int) -> None:
    shapes = [(64, 64, 56, 3, 1), (128, 128, 28, 3, 1), (256, 256, 14, 3, 1), (256, 1024, 14, 1, 1),
              (96, 96, 56, 3, 96)]
    for cin, cout, hw, ks, groups in shapes:
        x = torch.randn(1, cin, hw, hw)
        w = torch.randn(cout, cin // groups, ks, ks)
        qw, ws = torch.randint(-128, 128, w.shape, dtype=torch.int8), torch.rand(cout) * 0.01
        qx = torch.randint(0, 128, x.shape, dtype=torch.uint8)
        qx_cl = qx.contiguous(memory_format=torch.channels_last)
        pad, wzp = ks // 2, torch.zeros(cout, dtype=torch.long)
        packed = ONEDNN.qconv_prepack(qw, ws, 0.02, 64, [1, 1], [pad, pad], [1, 1], groups, list(x.shape))
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def q(inp: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
            out_scale, out_zp = (0.05, 64) if out_dtype is None else (1.0, 0)  # float output needs scale 1
            return ONEDNN.qconv_pointwise(inp, 0.02, 64, packed, ws, wzp, None, [1, 1], [pad, pad], [1, 1], groups,
                                          out_scale, out_zp, out_dtype, "none", [], "")
        fp32 = median_us(lambda: F.conv2d(x, w, None, 1, pad, 1, groups), repeats)
        report("conv2d", f"C={cin}->{cout} HW={hw} k={ks} g={groups}", fp32, {
            "fp32_cl": median_us(lambda: F.conv2d(x_cl, w, None, 1, pad, 1, groups), repeats),
            "onednn_cl": median_us(lambda: q(qx_cl), repeats),
            "onednn_nchw": median_us(lambda: q(qx), repeats),
            "onednn_f32out": median_us(lambda: q(qx_cl, torch.float32), repeats),
        })


def bench_embedding(repeats: int) -> None:
    for rows, dim, batch, bag in [(100_000, 64, 512, 20), (10_000, 256, 128, 10)]:
        table = torch.randn(rows, dim)
        q8 = torch.randint(0, 256, (rows, dim), dtype=torch.uint8)
        scale, zp = torch.rand(rows, 1), torch.rand(rows, 1) * 255
        idx = torch.randint(0, rows, (batch, bag))
        fp32 = median_us(lambda: F.embedding_bag(idx, table, mode="sum"), repeats)

        def int8_bag() -> torch.Tensor:
            return ((q8[idx].float() - zp[idx]) * scale[idx]).sum(1)
        report("embed_bag", f"rows={rows} dim={dim} B={batch}x{bag}", fp32, {"uint8_rows": median_us(int8_bag, repeats)})


BENCHES = {"linear": bench_linear, "dynamic": bench_dynamic, "weight_only": bench_weight_only, "conv": bench_conv,
           "embedding": bench_embedding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", default=",".join(BENCHES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for name in args.only.split(","):
        BENCHES[name](args.repeats)


if __name__ == "__main__":
    main()
