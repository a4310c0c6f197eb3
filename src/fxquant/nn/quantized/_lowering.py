"""Helpers shared by the ``from_reference`` constructors and the dynamic modules."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fxquant.nn.quantized._base import ActSpec, act_spec
from fxquant.nn.quantized.reference._weight import WeightSpec

__all__ = ["from_reference_args", "reference_weight", "dynamic_qparams"]

_OPTION_KEYS = frozenset({"input_dtype", "input_quant_min", "input_quant_max", "output_quant_min",
                          "output_quant_max", "other_scale", "other_zero_point", "other_dtype", "other_quant_min",
                          "other_quant_max"})


def from_reference_args(where: str, input_scale: Any, input_zero_point: Any, output_scale: Any,
                        output_zero_point: Any, output_dtype: torch.dtype, post_op: str,
                        options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``from_reference`` arguments into the ``act`` mapping ``QuantizedModuleBase._init_quant`` takes."""
    unknown = set(options) - _OPTION_KEYS
    if unknown:
        raise TypeError(f"{where}.from_reference: unknown option(s) {sorted(unknown)}; known: {sorted(_OPTION_KEYS)}")
    out = act_spec(output_dtype, options.get("output_quant_min"), options.get("output_quant_max"), where)
    if not out.dtype.is_floating_point and (output_scale is None or output_zero_point is None):
        raise ValueError(f"{where}.from_reference: output_dtype {out.dtype} needs output_scale and "
                         f"output_zero_point (or pass output_dtype=torch.float32 for a float output)")
    act = {"input_spec": act_spec(options.get("input_dtype", torch.uint8), options.get("input_quant_min"),
                                  options.get("input_quant_max"), where),
           "output_spec": out, "post_op": post_op, "input_scale": input_scale, "input_zero_point": input_zero_point,
           "output_scale": output_scale, "output_zero_point": output_zero_point,
           "other_scale": options.get("other_scale"), "other_zero_point": options.get("other_zero_point"),
           "other_spec": act_spec(options.get("other_dtype", torch.uint8), options.get("other_quant_min"),
                                  options.get("other_quant_max"), where)}
    return act


def reference_weight(ref: Any, where: str) -> tuple[WeightSpec, tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                                                    torch.Tensor | None]:
    """``(spec, (weight_int, weight_scale, weight_zero_point), bias)`` of an fxquant reference module."""
    specs = getattr(ref, "_weight_specs", None)
    if not specs or "weight" not in specs:
        raise TypeError(f"{where}.from_reference expects an fxquant reference module "
                        f"(fxquant.nn.quantized.reference.*), got {type(ref).__name__}")
    bias = ref.bias.detach() if getattr(ref, "bias", None) is not None else None
    return specs["weight"], (ref.weight_int, ref.weight_scale, ref.weight_zero_point), bias


def dynamic_qparams(x: torch.Tensor, spec: ActSpec, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine qparams from the running min / max (CONTRACT section 3): per tensor (0-d) or per token (``(..., 1)``)."""
    xf = x.detach().float()
    if granularity == "per_token":
        lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
    else:
        lo, hi = torch.aminmax(xf)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / float(spec.quant_max - spec.quant_min)).clamp(min=torch.finfo(torch.float32).eps)
    zero_point = (spec.quant_min - torch.round(lo / scale)).clamp(spec.quant_min, spec.quant_max)
    return scale, zero_point.to(torch.int64)
