"""Rules that fold what the other rules produced into the lowered modules (visited in graph order, last)::

    clamp(QConv(x), lo, hi)   -> QConv(x) with output range [lo, hi]     (ReLU6 / hardtanh after a conv)

A clamp of the integer output is exact to fold: the conv's onednn kernel applies it as a fused ``hardtanh``
before quantizing (quantization is monotonic).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .. import nn as fnn
from .lower_build import Lowering, Rule
from .lower_match import Pat

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


FOLD_RULES: tuple[Rule, ...] = (
    Rule("clamp_into_output_range", frozenset({torch.clamp}), Pat("*", name="out"), _clamp_replace, _clamp_when),
)
