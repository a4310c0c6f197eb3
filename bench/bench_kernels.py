"""Micro-benchmarks of the x86 CPU int8 kernels against fp32 in the same run (one thread, medians).

    .venv/bin/python bench/bench_kernels.py [--repeats 30]
        [--only linear,conv,dynamic,weight_only,embedding,gate,native]

Prints one line per (op, shape): the fp32 time and each int8 candidate's time as a speedup (fp32 / candidate;
> 1 means int8 is faster). Linear / conv / embedding go through the fxquant modules with each kernel forced;
"(0..127)" is reduce-range input (onednn exact without VNNI), "(0..255)" full-range input. Figures are noisy on a
shared machine; the rules in fxquant/kernels/x86.py are drawn from them.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fxquant.nn.quantized as Q
import fxquant.nn.quantized.reference as R
from fxquant.kernels import dynamic, fp16_gemm, native, uint8
from fxquant.nn.quantized import conv as conv_mod
from fxquant.nn.quantized import linear as linear_mod

ONEDNN = torch.ops.onednn
QUINT4X2 = getattr(torch, "quint4x2")  # torch.ao's name for 4-bit rows (normalised by fxquant)


def median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def compare_us(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median times of several candidates measured in interleaved rounds, so machine load hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def aten_only(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the native element-wise passes of fxquant.kernels.uint8 switched off (their aten forms)."""
    def run() -> object:
        saved, uint8.native_ready = uint8.native_ready, lambda t: False
        try:
            return fn()
        finally:
            uint8.native_ready = saved
    return run


def report_all(op: str, shape: str, times: dict[str, float]) -> None:
    fp32 = times.pop("fp32")
    report(op, shape, fp32, times)


def report(op: str, shape: str, fp32_us: float, candidates: dict[str, float]) -> None:
    parts = "  ".join(f"{name} {fp32_us / us:5.2f}x" for name, us in candidates.items())
    print(f"{op:12s} {shape:28s} fp32 {fp32_us:9.1f} us   {parts}", flush=True)


def _qweight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n) * 0.01 + 1e-3


def _linear_module(k: int, n: int, input_qmax: int, post_op: str = "none") -> Any:
    ref = R.Linear.from_float(nn.Linear(k, n), {"qscheme": torch.per_channel_affine, "dtype": torch.int8,
                                                 "scale": torch.rand(n) * 0.01 + 1e-3,
                                                 "zero_point": torch.zeros(n, dtype=torch.long), "axis": 0})
    return Q.Linear.from_reference(ref, 0.02, input_qmax // 2, 0.05, 64, post_op=post_op,
                                   input_quant_max=input_qmax)


def bench_linear(repeats: int) -> None:
    """Static linear through fxquant.nn.quantized.Linear with each kernel forced (uint8 in -> uint8 out)."""
    for m, k, n in [(1, 512, 512), (1, 1280, 1000), (4, 512, 512), (8, 768, 3072), (16, 512, 512), (32, 768, 768),
                    (64, 512, 512), (128, 768, 768), (128, 768, 3072), (512, 1024, 1024)]:
        x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        fns: dict[str, Callable[[], object]] = {"fp32": lambda: F.linear(x, w, bias)}
        for qmax, kernels in ((127, ("onednn", "float")), (255, ("onednn_split",))):
            mod = _linear_module(k, n, qmax)
            qx = torch.randint(0, qmax + 1, (m, k), dtype=torch.uint8)
            for kernel in kernels:
                fn = linear_mod._STATIC_KERNELS[kernel]
                fns[f"{kernel}(0..{qmax})"] = functools.partial(fn, mod, qx, None, mod._act)
            if fp16_gemm.available():  # the plans as the module runs them (fp16: any input range, exact)
                fns[f"float_plan(0..{qmax})"] = functools.partial(linear_mod._float_plan(mod), qx, None)
                fns[f"fp16_gemm_plan(0..{qmax})"] = functools.partial(linear_mod._fp16_gemm_plan(mod), qx, None)
        report_all("linear", f"M={m} K={k} N={n}", compare_us(fns, repeats))


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
    for m, k, n in [(1, 512, 512), (1, 4096, 4096), (16, 512, 512), (128, 768, 768), (128, 768, 3072)]:
        x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        qw, ws = _qweight(n, k)
        packed, wzp = ONEDNN.qlinear_prepack(qw, [m, k]), torch.zeros(n, dtype=torch.long)
        fp32 = median_us(lambda: F.linear(x, w, bias), repeats)
        module = Q.LinearDynamic.from_reference(_weight_only_reference(qw, ws))  # the kernel its rules pick
        report("dynamic", f"M={m} K={k} N={n}", fp32,
               {"onednn": median_us(lambda: _dynamic_onednn(x, packed, ws, wzp, bias), repeats),
                "LinearDynamic": median_us(lambda: module(x), repeats)})


def bench_weight_only(repeats: int) -> None:
    for m, k, n in [(1, 1024, 1024), (1, 4096, 4096), (16, 1024, 1024)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        qw, ws = _qweight(n, k)
        fp32 = median_us(lambda: F.linear(x, w), repeats)
        module = Q.LinearWeightOnly.from_reference(_weight_only_reference(qw, ws))  # the kernel its rules pick
        report("weight_only", f"M={m} K={k} N={n}", fp32, {
            "dequant+mm": median_us(lambda: F.linear(x, qw.float() * ws[:, None]), repeats),
            "int8pack_mm": median_us(lambda: torch.ops.aten._weight_int8pack_mm(x, qw, ws), max(3, repeats // 5)),
            "LinearWeightOnly": median_us(lambda: module(x), repeats),
        })


def _weight_only_reference(qw: torch.Tensor, ws: torch.Tensor) -> Any:
    lin = torch.nn.Linear(qw.shape[1], qw.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(qw.float() * ws[:, None])
    qparams = {"qscheme": torch.per_channel_affine, "dtype": torch.int8, "scale": ws,
               "zero_point": torch.zeros(len(ws), dtype=torch.long), "axis": 0, "quant_min": -128, "quant_max": 127}
    return R.Linear.from_float(lin, qparams)


def bench_conv(repeats: int) -> None:
    """Conv2d through fxquant.nn.quantized.Conv2d with each kernel forced (channels-last uint8 in -> uint8 out)."""
    shapes = [(64, 64, 56, 3, 1), (128, 128, 28, 3, 1), (256, 256, 14, 3, 1), (256, 1024, 14, 1, 1),
              (96, 96, 56, 3, 96)]
    for cin, cout, hw, ks, groups in shapes:
        conv = nn.Conv2d(cin, cout, ks, padding=ks // 2, groups=groups)
        ref = R.Conv2d.from_float(conv, {"qscheme": torch.per_channel_affine, "dtype": torch.int8,
                                         "scale": torch.rand(cout) * 0.01 + 1e-3,
                                         "zero_point": torch.zeros(cout, dtype=torch.long), "axis": 0})
        x = torch.randn(1, cin, hw, hw)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns: dict[str, Callable[[], object]] = {"fp32": lambda: conv(x), "fp32_cl": lambda: conv(x_cl)}
        for qmax, kernels in ((127, ("onednn", "float")), (255, ("onednn_split",))):
            mod = Q.Conv2d.from_reference(ref, 0.02, qmax // 2, 0.05, 64, input_quant_max=qmax)
            qx = torch.randint(0, qmax + 1, x.shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
            for kernel in kernels:
                fns[f"{kernel}(0..{qmax})"] = functools.partial(conv_mod._KERNELS[kernel], mod, qx, None)
        report_all("conv2d", f"C={cin}->{cout} HW={hw} k={ks} g={groups}", compare_us(fns, repeats))


def bench_embedding(repeats: int) -> None:
    """fxquant.nn.quantized.EmbeddingBag (8-bit and 4-bit rows) against float F.embedding_bag, with each kernel of the
    "embedding" rules forced: native (one fused pass), cached_float (fp32's kernel on a cached dequantized table,
    8-bit only here) and gather (dequantize the looked-up rows with aten ops)."""
    for rows, dim, batch, bag in [(100_000, 64, 1, 10), (100_000, 64, 16, 10), (100_000, 64, 512, 20),
                                  (10_000, 256, 128, 10), (200, 16, 4, 3)]:
        float_bag = nn.EmbeddingBag(rows, dim, mode="sum")
        idx = torch.randint(0, rows, (batch, bag))
        fns: dict[str, Callable[[], object]] = {"fp32": lambda: float_bag(idx)}
        for qmax, name in ((255, "u8"), (15, "u4")):
            w = float_bag.weight.detach()
            lo, hi = w.amin(1).clamp_max(0), w.amax(1).clamp_min(0)
            scale = (hi - lo) / qmax
            ref = R.EmbeddingBag.from_float(float_bag, {"qscheme": torch.per_channel_affine_float_qparams,
                                                        "dtype": torch.uint8 if qmax == 255 else QUINT4X2,
                                                        "scale": scale, "zero_point": -lo / scale, "axis": 0})
            for kernel in ("native", "cached_float", "gather") if qmax == 255 else ("native", "gather"):
                if kernel == "native" and not native.available():
                    continue
                mod = Q.EmbeddingBag.from_reference(ref)
                mod.__dict__["_kernel_cache"] = {"kernel": kernel}  # forced
                fns[f"{name}_{kernel}"] = functools.partial(mod, idx)
        report_all("embed_bag", f"rows={rows} dim={dim} B={batch}x{bag}", compare_us(fns, repeats))


def bench_gate(repeats: int) -> None:
    """A squeeze-excite gate (N, C, 1, 1) times a channels-last feature map: QuantizedBinary's per-channel factors
    (one addcmul over the map) against its general three-pass form (forced) and fp32's multiply."""
    mod = Q.QuantizedBinary("mul", (0.05, 3), (1 / 256, 0), (0.04, 2))

    def general(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        saved, uint8._BROADCAST_RATIO = uint8._BROADCAST_RATIO, float("inf")
        try:
            return mod(a, b)
        finally:
            uint8._BROADCAST_RATIO = saved
    for n, c, hw in [(1, 96, 14), (1, 576, 7), (16, 96, 14), (16, 576, 7)]:
        fmap = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        gate = torch.randint(0, 256, (n, c, 1, 1), dtype=torch.uint8)
        fmap_f, gate_f = fmap.float(), gate.float()
        report_all("gate_mul", f"N={n} C={c} HW={hw}", compare_us({
            "fp32": lambda: fmap_f * gate_f, "factors": lambda: mod(fmap, gate),
            "three_pass": lambda: general(fmap, gate)}, repeats))


def bench_native(repeats: int) -> None:
    """The native FBGEMM kernels (fxquant.kernels.native) against the kernels the rules used before them: convs
    at the sizes of small CNNs (the fbgemm plan forced, 7-bit input) vs onednn and the folded float plan; static
    linear vs onednn, the folded float plan and the fp16 GEMM; dynamic
    linear vs onednn with aten's run-time quantization; the one-pass Quantize (float -> uint8, also straight into
    channels-last; "fp32" here is a copy of the input), DeQuantize, 256-entry table, add, gate product and
    per-channel shift add vs their aten forms; the dynamic LSTM's native recurrence vs its aten form."""
    if not native.available():
        print(f"native kernels unavailable: {native.status()}")
        return
    for n, cin, cout, hw, ks, groups in [(1, 16, 8, 1, 1, 1), (1, 576, 144, 1, 1, 1), (1, 96, 576, 7, 1, 1),
                                         (1, 40, 120, 28, 1, 1), (1, 120, 120, 28, 5, 120), (1, 576, 576, 7, 5, 576),
                                         (1, 256, 256, 14, 3, 1), (1, 24, 144, 56, 1, 1), (16, 576, 144, 1, 1, 1),
                                         # 3x3 convs at large outputs (x86 rule "min_reduction": from 128 channels)
                                         (1, 64, 64, 56, 3, 1), (1, 128, 128, 56, 3, 1), (1, 256, 256, 28, 3, 1),
                                         (1, 256, 256, 56, 3, 1), (16, 256, 256, 28, 3, 1)]:
        conv = nn.Conv2d(cin, cout, ks, padding=ks // 2, groups=groups)
        ref = R.Conv2d.from_float(conv, {"qscheme": torch.per_channel_affine, "dtype": torch.int8,
                                         "scale": torch.rand(cout) * 0.01 + 1e-3,
                                         "zero_point": torch.zeros(cout, dtype=torch.long), "axis": 0})
        x_cl = torch.randn(n, cin, hw, hw).contiguous(memory_format=torch.channels_last)
        mod = Q.Conv2d.from_reference(ref, 0.02, 60, 0.05, 64, input_quant_max=127)
        qx = torch.randint(0, 128, x_cl.shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        plans = {name: conv_mod._PLANS[name](mod, name) for name in ("fbgemm", "onednn", "float")}
        fns: dict[str, Callable[[], object]] = {"fp32": lambda: conv(x_cl)}
        fns.update({name: functools.partial(plan, qx, None) for name, plan in plans.items()})
        report_all("conv2d", f"N={n} C={cin}->{cout} HW={hw} k={ks} g={groups}", compare_us(fns, repeats))
    # static linear (7-bit input, full-scale per-channel weights): the native plan vs the plans the rules had
    for m, k, n in [(4, 8, 16), (1, 512, 1000), (16, 512, 1000), (8, 768, 3072), (128, 768, 768)]:
        lin = nn.Linear(k, n)
        scale = lin.weight.detach().abs().amax(dim=1) / 127
        mod = Q.Linear.from_reference(R.Linear.from_float(lin, {
            "qscheme": torch.per_channel_affine, "dtype": torch.int8, "scale": scale,
            "zero_point": torch.zeros(n, dtype=torch.long), "axis": 0}), 0.02, 60, 0.05, 64, input_quant_max=127,
            output_quant_max=127)
        qx, xf = torch.randint(0, 128, (m, k), dtype=torch.uint8), torch.randn(m, k)
        plans = {name: linear_mod._PLANS[name](mod) for name in ("fbgemm", "onednn", "float", "fp16_gemm")}
        fns = {"fp32": lambda: lin(xf)}
        fns.update({name: functools.partial(plan, qx, None) for name, plan in plans.items()})
        report_all("linear", f"M={m} K={k} N={n}", compare_us(fns, repeats))
    for m, k, n in [(1, 768, 768), (16, 512, 512), (128, 768, 768), (128, 768, 3072), (1, 4096, 4096)]:
        lin = nn.Linear(k, n)
        qw, ws = _qweight(n, k)
        mod = Q.LinearDynamic.from_reference(R.Linear.from_float(lin, {
            "qscheme": torch.per_channel_affine, "dtype": torch.int8, "scale": ws,
            "zero_point": torch.zeros(n, dtype=torch.long), "axis": 0}), quant_min=0, quant_max=127)
        x = torch.randn(m, k)
        plan = native.DynamicLinearPlan(mod.weight_int, mod.weight_scale, mod.bias, False)

        def fbgemm(x: torch.Tensor = x, plan: Any = plan) -> torch.Tensor:
            lo, hi = torch.aminmax(x)
            scale, zp = dynamic.affine_qparams(float(lo), float(hi), 0, 127)
            return plan(x, scale, zp)
        packed = linear_mod.onednn.pack_linear(mod.weight_int)
        wzp = torch.zeros(n, dtype=torch.long)
        report_all("dyn_linear", f"M={m} K={k} N={n}", compare_us({
            "fp32": lambda: lin(x), "fbgemm": fbgemm,
            "onednn": lambda: _dynamic_onednn(x, packed, mod.weight_scale, wzp, lin.bias)}, repeats))
    quant, quant_cl = Q.Quantize(0.05, 60), Q.Quantize(0.05, 60, channels_last=True)
    cl = torch.channels_last
    for shape in [(1, 64), (1, 3, 32, 32), (1, 3, 224, 224)]:
        x = torch.randn(*shape)
        inv, bias, _ = quant._scalars()
        fns = {"fp32": lambda: x.clone(), "native": lambda: quant(x),
               "aten": aten_only(lambda: uint8.quantize(x, inv, bias, 0, 255, torch.uint8))}
        if len(shape) == 4:  # into the channels-last layout a first conv reads: one pass vs quantize + copy
            fns.update({"native_cl": lambda: quant_cl(x), "aten_cl": aten_only(
                lambda: uint8.quantize(x, inv, bias, 0, 255, torch.uint8).contiguous(memory_format=cl))})
        report_all("quantize", f"{tuple(shape)}", compare_us(fns, repeats))
    dequant = Q.DeQuantize(0.05, 60)
    for shape in [(1, 1000), (1, 256, 56, 56)]:
        q = torch.randint(0, 256, shape, dtype=torch.uint8)
        report_all("dequantize", f"{tuple(shape)}", compare_us({
            "fp32": lambda: q.to(torch.float32), "native": lambda: dequant(q),
            "aten": aten_only(lambda: dequant(q))}, repeats))
    table = torch.randint(0, 256, (256,), dtype=torch.uint8)  # a GELU / requantization table
    for shape in [(1, 3072), (1, 64, 112, 112)]:
        q = torch.randint(0, 256, shape, dtype=torch.uint8)
        report_all("lookup", f"{tuple(shape)}", compare_us({
            "fp32": lambda: q.clone(), "native": lambda: uint8.lookup(q, table),
            "aten": aten_only(lambda: uint8.lookup(q, table))}, repeats))
    # a frozen batch norm's shift (1, C, 1, 1) added to a map: the native per-channel affine pass vs aten's form
    shift_add = Q.QuantizedBinary("add", (0.0517, 10), (0.0231, 128), (0.0613, 20))
    for n, c, hw in [(1, 64, 56), (2, 64, 56)]:
        a = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        s = torch.randint(0, 256, (1, c, 1, 1), dtype=torch.uint8)
        consts, relu_min = shift_add._scalars()
        fa, fs = a.float(), s.float()
        report_all("shift_add", f"N={n} C={c} HW={hw}", compare_us({
            "fp32": lambda: fa + fs, "native": lambda: shift_add(a, s),
            "aten": aten_only(lambda: uint8.binary("add", a, s, consts, relu_min, 0, 255, torch.uint8))}, repeats))
    add = Q.QuantizedBinary("add", (0.05, 60), (0.04, 70), (0.07, 60))
    gate = Q.QuantizedBinary("mul", (0.05, 3), (1 / 256, 0), (0.04, 2))
    for n, c, hw in [(1, 24, 56), (1, 96, 14), (16, 96, 14)]:
        a = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        b = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        g = torch.randint(0, 256, (n, c, 1, 1), dtype=torch.uint8)
        add_consts, relu_min = add._scalars()
        gate_consts, _ = gate._scalars()
        fa, fb, fg = a.float(), b.float(), g.float()
        report_all("add", f"N={n} C={c} HW={hw}", compare_us({
            "fp32": lambda: fa + fb, "native": lambda: add(a, b),
            "aten": aten_only(lambda: uint8.binary("add", a, b, add_consts, relu_min, 0, 255, torch.uint8))},
            repeats))
        report_all("gate_mul", f"N={n} C={c} HW={hw}", compare_us({
            "fp32": lambda: fa * fg, "native": lambda: gate(a, g),
            "aten": aten_only(lambda: uint8.binary("mul", a, g, gate_consts, 0, 0, 255, torch.uint8))},
            repeats))

    # a 2-layer dynamic LSTM (torch.ao's converted numerics) over 32 steps: the native loop, the reference's float
    # recurrence (the eager fallback) and the native loop's arithmetic in aten ops step by step (torch.export's
    # form), against fp32's nn.LSTM (oneDNN's fused RNN)
    for batch, hidden in [(1, 256), (16, 256), (1, 64)]:
        lstm = nn.LSTM(hidden // 2, hidden, num_layers=2, batch_first=True).eval()
        qparams = {name: {"qscheme": torch.per_tensor_symmetric, "dtype": torch.qint8, "zero_point": 0,
                          "scale": w.detach().abs().max() / 127.5}
                   for name, w in lstm.named_parameters() if name.startswith("weight")}
        fast = Q.DynamicLSTM.from_reference(R.LSTM.from_float(lstm, qparams))
        slow = Q.DynamicLSTM.from_reference(R.LSTM.from_float(lstm, qparams))
        slow._kernel_cache["path"] = "aten"
        ref_form = Q.DynamicLSTM.from_reference(R.LSTM.from_float(lstm, qparams))
        ref_form._kernel_cache["path"] = "float"
        x = torch.randn(batch, 32, hidden // 2)
        with torch.no_grad():
            report_all("lstm_dynamic", f"N={batch} T=32 H={hidden} 2 layers", compare_us({
                "fp32": lambda: lstm(x), "native": lambda: fast(x), "float": lambda: ref_form(x),
                "aten": lambda: slow(x)}, max(3, repeats // 3)))


BENCHES = {"linear": bench_linear, "dynamic": bench_dynamic, "weight_only": bench_weight_only, "conv": bench_conv,
           "embedding": bench_embedding, "gate": bench_gate, "native": bench_native}


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
