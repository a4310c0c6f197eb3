"""x86 CPU kernel choice: capability facts plus measured rules, kept as data.

A lowered module asks :func:`choose` which kernel to run for one call. Rules are ordered; the first whose
conditions all hold wins. Each condition is a name from :data:`CONDITIONS` with a value, so a new rule is a line of
data. The figures behind them come from ``bench/bench_kernels.py`` (one thread, medians, fp32 in the same run) on
an AVX2 CPU without VNNI (AMD EPYC, torch 2.13 CPU); ratios are fp32 time / int8 time:

=========================  =========================================================================================
static linear, M=1         onednn 0.41-0.55x, float path 0.33-0.49x (K=N=512; torch._int_mm 0.12x): a tie -> float;
                           (2026) the float path's weight integers in float16 (fbgemm's fp16 GEMM, exact), as
                           fp16_gemm_plan vs float_plan vs onednn (7-bit): 1280 -> 1000 at M=1 1.42x / 0.89x /
                           0.31x; M=4, K=N=512 1.33x / 0.71x / 0.76x; M=8, 768 -> 3072 2.30x / 1.00x / 1.62x;
                           M=16, K=N=512 1.16x / 0.78x / 0.84x; M=32, K=N=768 1.25x / 0.84x / 1.18x; M=128,
                           768 -> 3072 1.33x / 0.98x / 2.12x; onednn_split 0.2-0.96x -> "fp16_gemm" up to 16 rows
                           from 2^18 MACs, then onednn for 7-bit input, and fp16 at any size for full-range input
                           (the split: ~0.9x); weight-only linear up to 8 rows (1.2-1.7x fp32 at M=1); dynamic
                           linear from 2^20 MACs after onednn (M=1, K=N=4096: 1.26x fp32, onednn 0.64x)
static linear, M=4..64     onednn 1.0-1.7x, float path 0.6-0.9x (K=N=512)
static linear, M>=128      onednn 1.3-5x (K,N 768..3072); full-range input split in two: 0.9-1.4x, float 0.9x
dynamic linear             onednn incl. run-time quantization: 0.17x (M=1), 0.67x (M=16), 1.16x (M=128,
                           K=N=768), 2.1-4.5x (M=128, N=3072) -> onednn from 64 rows
weight-only linear         dequantize per call 0.05-0.4x, aten._weight_int8pack_mm 0.01-0.25x on AVX2 -> cached
                           dequantized weight (1.0x), int8pack_mm only with AVX512
conv2d 3x3 / 1x1 (7-bit)   onednn 1.1-9x (channels-last); float path 0.6-1.3x
conv2d, full-range input   split: 1x1 2.5x, 3x3 0.6-0.9x (float path 0.6-0.9x) -> split only for 1x1 convs
depthwise conv2d           onednn 0.66-1.26x, float path 0.41x -> onednn
embedding / embedding bag  native one pass (gather, dequantize, reduce; exact) 1.06-1.9x fp32 (B=1x10 to 512x20,
                           dim 16-256, 8 and 4 bits); a cached float table 1.2-1.7x but 4x the int8 table's memory;
                           gather + dequantize rows with aten ops 0.2-0.55x -> native, else the cached table while it
                           fits max_table_bytes
small convs / linears      onednn's int8 ops build their primitive descriptor on every call: ~75 us at any size
(fxquant lowering, 2026)   on this CPU (oneDNN verbose: create ~40 us, execute 6-10 us for an 8x8x16 3x3 conv).
                           Below ~2^18 MACs a float conv with the qparams folded into weight and bias (4 aten ops)
                           is 1.3x faster (66 vs 89 us, batch 1); at batch 16 onednn is 2x faster (97 vs 212 us),
                           and whole models at batch 16 ran 10-20% slower with small convs in float -> batch <= 2.
                           Depthwise: onednn 52 us vs float 85-160 us at batch 1 -> onednn. A residual add costs
                           the float conv one op, onednn's binary variant 90-120 us.
                           Linear: float below 2^20 MACs; dynamic linear: onednn only from 2^25 MACs (its quantize
                           costs three more ops), e.g. BERT-base shapes at 128 tokens
native FBGEMM (2026-11)     fxquant.kernels.native, bench_kernels.py --only native: conv at batch 1, 1x1 on a 1x1
                           image 1.6-2.1x fp32 (onednn 0.5-0.7x, float 0.6x); 96->576 1x1 at 7x7 2.1x (onednn
                           1.1x); 3x3 256 at 14x14 2.7x (2.3x); 24->144 1x1 at 56x56 0.89x (1.02x) -> outputs up to
                           2^17 elements. Dynamic linear 1.6x (M=1, K=N=768; onednn 0.41x) to 2.7x (M=1, K=N=4096;
                           0.60x), 1.9x at M=128 (1.4x) -> every size. Add / gate product: one pass, ~2x aten's
=========================  =========================================================================================

(1 thread, medians of interleaved rounds; the machine was shared, so ratios moved by up to 2x between runs.)

Exactness: without VNNI, onednn multiplies uint8 by int8 with ``vpmaddubsw``, which saturates pairs of products
in int16. That is exact only while activations stay in 0..127 (torch.ao's x86 ``reduce_range``). Full-range
uint8 input therefore runs as two exact calls on ``x >> 1`` and ``x & 1`` ("onednn_split"), summed in float.
"onednn_unfused" is one exact call with float output, for post-ops onednn cannot fuse at that rank (conv3d + relu).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import fp16_gemm, native

__all__ = ["Facts", "Rule", "RULES", "CONDITIONS", "choose", "cpu_has_vnni", "cpu_has_avx512", "onednn_available"]


@functools.cache
def _capabilities() -> dict[str, Any]:
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):  # older / other builds: assume the weakest x86
        return {}


def cpu_has_vnni() -> bool:
    """True when uint8 x int8 dot products accumulate in int32 without saturation (VNNI / AMX)."""
    caps = _capabilities()
    return any(bool(caps.get(k)) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))


def cpu_has_avx512() -> bool:
    return bool(_capabilities().get("avx512_f")) and bool(_capabilities().get("avx512_bw"))


@functools.cache
def onednn_available() -> bool:
    """onednn's int8 ops are registered and usable on this build."""
    ops = torch.ops.onednn
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(ops, name) for name in ("qlinear_prepack", "qlinear_pointwise", "qconv_prepack", "qconv_pointwise"))
    except (RuntimeError, AttributeError):
        return False


@dataclasses.dataclass(frozen=True)
class Facts:
    """What a kernel choice may depend on, for one call."""

    device: str = "cpu"
    rows: int = 1  # GEMM M (batch * tokens) for linear; batch for conv
    onednn_ok: bool = False  # the module's dtypes / zero points fit onednn (int8 symmetric weight, uint8 input)
    input_7bit: bool = False  # activations are known to stay in 0..127
    depthwise: bool = False
    pointwise: bool = False  # 1x1 conv
    macs: int = 0  # multiply-accumulates of one call (0: not known)
    fused_ok: bool = True  # onednn fuses the module's post-op for this op / rank
    compiling: bool = False  # torch.export / torch.compile tracing: plain aten ops only
    table_bytes: int = 0  # embedding: size of the table in float32
    binary: bool = False  # the post-op adds a second quantized operand
    float16_weight: bool = False  # weight-only linear with float16 weights
    native_ok: bool = False  # the module fits the native kernel (conv: see Conv2d._native_ok)
    outputs: int = 0  # elements of one call's output (0: not known)
    positions: int = 0  # conv: output positions of one image and channel (0: not known)


CONDITIONS: dict[str, Callable[[Facts, Any], bool]] = {
    "device": lambda f, v: f.device == v,
    "min_rows": lambda f, v: f.rows >= v,
    "max_rows": lambda f, v: f.rows <= v,
    "onednn_ok": lambda f, v: (f.onednn_ok and onednn_available()) == v,
    "exact_u8s8": lambda f, v: (f.input_7bit or cpu_has_vnni()) == v,
    "depthwise": lambda f, v: f.depthwise == v,
    "pointwise": lambda f, v: f.pointwise == v,
    "min_macs": lambda f, v: f.macs >= v,
    "max_macs": lambda f, v: 0 < f.macs < v,  # (0: not known)
    "macs_unknown_or_at_least": lambda f, v: f.macs == 0 or f.macs >= v,
    "binary": lambda f, v: f.binary == v,
    "fused_ok": lambda f, v: f.fused_ok == v,
    "avx512": lambda f, v: cpu_has_avx512() == v,
    "compiling": lambda f, v: f.compiling == v,
    "max_table_bytes": lambda f, v: f.table_bytes <= v,
    "float16_weight": lambda f, v: f.float16_weight == v,
    "fp16_gemm": lambda f, v: fp16_gemm.available() == v,
    "native": lambda f, v: (f.native_ok and native.available()) == v,
    "max_outputs": lambda f, v: 0 < f.outputs <= v,
    "max_positions": lambda f, v: 0 < f.positions <= v,
    # multiply-accumulates per output element (conv: in_channels / groups * kernel area; 0 outputs: not known)
    "min_reduction": lambda f, v: f.outputs > 0 and f.macs >= v * f.outputs,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    kernel: str
    when: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def matches(self, facts: Facts) -> bool:
        return all(CONDITIONS[name](facts, value) for name, value in self.when.items())


_EAGER_CPU = {"device": "cpu", "compiling": False, "onednn_ok": True}
_FP16 = {"device": "cpu", "compiling": False, "fp16_gemm": True}
RULES: dict[str, tuple[Rule, ...]] = {
    "linear": (
        # FBGEMM's static GEMM (native, requantization fused; bench_kernels.py --only native): vs fp32 0.98x at
        # 4x8x16 (the others 0.32-0.52x), 3.2x at M=1 K=512 N=1000 (fp16_gemm 1.7x, onednn 0.60x), 5.5x at M=8
        # K=768 N=3072 (onednn 2.0x), 1.9x at M=128 K=N=768 (onednn 1.7x) -> at every size
        Rule("fbgemm", {"device": "cpu", "compiling": False, "native": True, "exact_u8s8": True}),
        Rule("fp16_gemm", {**_FP16, "max_rows": 16, "min_macs": 2**18}),
        Rule("onednn", {**_EAGER_CPU, "min_rows": 2, "macs_unknown_or_at_least": 2**20, "exact_u8s8": True}),
        Rule("fp16_gemm", {**_FP16, "min_macs": 2**20, "exact_u8s8": False}),  # beats the split at every size
        Rule("onednn_split", {**_EAGER_CPU, "min_rows": 128, "min_macs": 2**28, "exact_u8s8": False}),
        Rule("float"),
    ),
    "conv": (
        Rule("fbgemm", {"device": "cpu", "compiling": False, "native": True, "exact_u8s8": True,
                        "max_outputs": 2**17}),
        # larger calls (batch 16): FBGEMM vs onednn 1.02-1.21x for 3x3 convs of 128-512 channels at 14x14 / 7x7
        # outputs, 1.1-2.2x depthwise at 14x14 / 7x7; but 0.87-0.88x at 56x56, 0.7-0.8x depthwise at 28x28 and
        # 0.8-0.93x for 1x1 convs (one and two threads) -> kernels above 1x1 with up to 14x14 outputs
        Rule("fbgemm", {"device": "cpu", "compiling": False, "native": True, "exact_u8s8": True,
                        "pointwise": False, "max_positions": 196}),
        # and at any size where each output sums at least 1024 products (3x3 convs from 128 channels): FBGEMM vs
        # onednn 1.02-1.06x at batch 1 (128-512 channels at 28x28 / 56x56), 1.03x at batch 16, 0.99-1.18x with two
        # threads; below (64 / 96 channels: 576 / 864 products) onednn wins, 0.86-0.95x (bench_kernels.py --only
        # native: the conv2d rows with HW=28 / 56, k=3)
        Rule("fbgemm", {"device": "cpu", "compiling": False, "native": True, "exact_u8s8": True,
                        "pointwise": False, "min_reduction": 1024}),
        Rule("float", {"compiling": False, "max_rows": 2, "max_macs": 2**18, "depthwise": False}),
        Rule("onednn", {**_EAGER_CPU, "exact_u8s8": True, "fused_ok": True}),
        Rule("onednn_unfused", {**_EAGER_CPU, "exact_u8s8": True}),
        Rule("onednn_split", {**_EAGER_CPU, "exact_u8s8": False, "pointwise": True}),
        Rule("float"),
    ),
    "linear_dynamic": (
        # FBGEMM's dynamic linear (native, quantizing while packing): 70 vs 329 us (onednn) / 95 us (fp32) at M=1,
        # K=N=768; 1.4 vs 1.9 / 2.8 ms at M=128; 1.2 vs 11 / 5.9 ms at M=1, K=N=4096 -> at every size
        Rule("fbgemm", {"device": "cpu", "compiling": False, "native": True, "exact_u8s8": True}),
        Rule("onednn", {**_EAGER_CPU, "min_rows": 64, "macs_unknown_or_at_least": 2**25, "exact_u8s8": True}),
        # (from 2^20 MACs: below, the run-time quantization's ops cost more than the halved weight read saves)
        Rule("fp16_gemm", {**_FP16, "min_macs": 2**20}),
        Rule("onednn_split", {**_EAGER_CPU, "min_rows": 128, "min_macs": 2**28, "exact_u8s8": False}),
        Rule("float"),
    ),
    # a dynamic LSTM / GRU (torch.ao's numerics): FBGEMM's dynamic GEMM for the input projection and inside a native
    # loop over the steps; else (eager) the reference's float recurrence, since the int8 arithmetic step by step in
    # aten ops -- what torch.export traces -- costs 3-30x fp32 (bench_kernels.py --only native, lstm_dynamic rows)
    "rnn_dynamic": (
        Rule("fbgemm", {"device": "cpu", "compiling": False, "native": True, "exact_u8s8": True}),
        Rule("float"),
    ),
    "linear_weight_only": (
        # float16 weights: fp32's F.linear on a cached float32 copy, or fbgemm's fp16 GEMM reading the float16
        # values themselves: K=768, N=768 / 3072 at 8..512 rows 2.3..1.0x / 3.3..1.1x (see above) -> always
        Rule("fp16_gemm_half", {**_FP16, "float16_weight": True}),
        Rule("float", {"float16_weight": True}),
        Rule("int8pack_mm", {"device": "cpu", "compiling": False, "avx512": True}),
        Rule("fp16_gemm", {**_FP16, "max_rows": 8, "min_macs": 2**18}),
        Rule("float"),
    ),
    # quantized add of two uint8 images: an identity depthwise conv with onednn's sum post-op (one call, ~140 us
    # fixed cost here) against five aten passes (~2-4 ns an element): 192 vs 354 us at 1x64x56x56, 2.6 vs 13.8 ms
    # at 16x64x56x56, 142 vs 72 us at 1x512x7x7 -> onednn from 2^16 elements
    "add": (
        Rule("native", {"device": "cpu", "compiling": False, "native": True}),
        Rule("onednn_identity_conv", {**_EAGER_CPU, "min_macs": 2**16}),
        Rule("aten"),
    ),
    # eval batch norm (+ relu) on a uint8 image: a 1x1 depthwise int8 conv (one call, ~100 us fixed) against
    # addcmul + uint8.finish (four aten passes), onednn vs float: 248 vs 226 us at 1x64x56x56, 230 vs 156 at
    # 1x512x14x14, 372 vs 511 at 2x256x28x28, 520 vs 789 at 4x64x56x56, 3.2 vs 9.1 ms at 16x256x28x28 (one
    # thread) -> onednn from 2^18 elements
    "batch_norm": (
        # native one pass (AVX2 multiply-add, clamp, round; the float kernel's arithmetic): channels-last 1x256x56x56
        # 146 us, 1x1024x7x7 20 us where torch.ao's BNReLU2d takes 211 / 40 us; densenet121's 62 BN + ReLU at 224
        # 27 ms in the two kernels below, 7.5 ms native (torch.ao 6.3 ms, per-node medians) -> at every size
        Rule("native", {"device": "cpu", "compiling": False, "native": True}),
        Rule("onednn_depthwise", {**_EAGER_CPU, "min_macs": 2**18}),
        Rule("float"),
    ),
    # embedding lookups: the native kernel reads only the int8 rows looked up; without it a cached float table is
    # fp32's own kernel (one gather, no dequantize per call) but costs 4x the int8 table's memory, so only below
    # max_table_bytes; else gather int8 rows and dequantize them
    "embedding": (
        Rule("native", {"compiling": False, "device": "cpu", "native": True}),
        Rule("cached_float", {"compiling": False, "max_table_bytes": 64 * 2**20}),
        Rule("gather"),
    ),
}


# kernels that multiply uint8 by int8 with vpmaddubsw on CPUs without VNNI (exact for 7-bit input, pairs of products
# saturating in int16 beyond it), as FBGEMM does: where a native call refuses input beyond its int16-safe limit and
# the rules would give one of these, the unchecked FBGEMM call is no less exact and faster
SATURATING = frozenset({"onednn", "onednn_unfused"})


def choose(op: str, facts: Facts) -> str:
    """Name of the kernel to run for ``op`` under ``facts`` (``"float"`` is always available)."""
    try:
        rules = RULES[op]
    except KeyError:
        raise KeyError(f"no kernel rules for op {op!r}; known ops: {sorted(RULES)}") from None
    for rule in rules:
        if rule.matches(facts):
            return rule.kernel
    return "float"
