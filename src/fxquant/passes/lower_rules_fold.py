"""Rules that fold what the other rules produced into the lowered modules (visited in graph order, last)::

    clamp(QConv(x), lo, hi)         -> QConv(x) with output range [lo, hi]     (ReLU6 / hardtanh after a conv)
    LookupTable[hardswish](QConv(x)) -> QConv(x) with post_op hardswish, the table's output qparams

A clamp of the integer output is exact to fold: the conv's onednn kernel applies it as a fused ``hardtanh``
before quantizing (quantization is monotonic). onednn applies a folded activation before the one rounding (as
the fused residual add skips the conv output's), so that output may differ from the reference by one step of it;
the conv keeps its own output qparams and the table, and the native FBGEMM kernel rounds, then looks up: exact.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import nn as fnn
from .lower_build import Lowering, Rule
from .lower_match import Pat
from .lower_rules_elementwise import UNARY_CHAIN

__all__ = ["FOLD_RULES"]

Q = fnn.quantized
_RANGED = (Q.Conv1d, Q.Conv2d, Q.Conv3d, Q.Linear)


def _producer(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    return m["out"].args[0]  # type: ignore[return-value]


def _clamp_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    src = _producer(low, m)
    mod = low.module(src) if isinstance(src, fx.Node) else None
    if type(mod) not in _RANGED or len(src.users) != 1:
        return "the clamped value is not the only use of a lowered conv / linear"
    if mod.output_spec.dtype.is_floating_point or len(m["out"].args) != 3 or m["out"].kwargs:
        return "not an integer clamp with two bounds"
    return ""


def _clamp_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    src = _producer(low, m)
    mod = low.module(src)
    lo, hi = int(m["out"].args[1]), int(m["out"].args[2])
    spec = mod.output_spec
    mod.output_spec = dataclasses.replace(spec, quant_min=max(lo, spec.quant_min), quant_max=min(hi, spec.quant_max))
    mod._kernel_cache = {}
    return src


# activations onednn applies inside an int8 conv (a 2-d one: see fxquant.kernels.onednn.CONV_FUSED)
_CONV_ACTIVATIONS = {nn.Hardswish: "hardswish", F.hardswish: "hardswish", nn.SiLU: "silu", F.silu: "silu"}


def _activation_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    chain, out = m["out"].meta.get(UNARY_CHAIN, ((), None))
    src = _producer(low, m)
    mod = low.module(src) if isinstance(src, fx.Node) else None
    if len(chain) != 1 or chain[0] not in _CONV_ACTIVATIONS:
        return "not one activation a conv can apply"
    if type(mod) is not Q.Conv2d or mod.post_op != "none" or len(src.users) != 1:
        return "the table's input is not the only use of a lowered Conv2d without post-op"
    return "" if mod.output_spec.dtype == out.dtype else "output dtypes differ"


def _activation_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    chain, out = m["out"].meta[UNARY_CHAIN]
    src = _producer(low, m)
    mod = low.module(src)
    # the conv's own output qparams and the table from them: a kernel that rounds the conv output first (the
    # native FBGEMM one) applies the table after it, exactly as the reference does
    mod.set_pre_activation(float(mod.output_scale), int(mod.output_zero_point), mod.output_spec.quant_min,
                           mod.output_spec.quant_max, low.module(m["out"]).table)
    mod.post_op = _CONV_ACTIVATIONS[chain[0]]
    mod.output_scale.fill_(out.scale)
    mod.output_zero_point.fill_(out.zero_point)
    mod.output_spec = dataclasses.replace(mod.output_spec, quant_min=out.quant_min, quant_max=out.quant_max)
    mod._kernel_cache = {}
    return src


FOLD_RULES: tuple[Rule, ...] = (
    Rule("activation_into_conv", frozenset({Q.LookupTable}), Pat("*", name="out"), _activation_replace,
         _activation_when),
    Rule("clamp_into_output_range", frozenset({torch.clamp}), Pat("*", name="out"), _clamp_replace, _clamp_when),
)
