"""Quantized weight storage shared by all reference modules.

A reference module keeps each quantized weight ``<name>`` as three plain-dtype buffers::

    <name>_int          the quantized values (int8 / uint8 / int32, or fp16 / bf16 / fp8 for float targets;
                        the float weight itself when the qscheme is ``None``)
    <name>_scale        float32, shape () per tensor or (C,) per channel
    <name>_zero_point   int64 (float32 for ``per_channel_affine_float_qparams``), same shape as the scale

plus a :class:`WeightSpec` (qscheme, plain dtype, value range, axis) kept in ``_weight_specs`` and saved in the
state dict as ``_extra_state`` (strings and ints only, so ``torch.load(weights_only=True)`` accepts it).

Numerics match torch's x86 CPU quantizer bit for bit (checked against torch.ao in the tests):

* per tensor:  ``q = clamp(rint(fma(w, 1/scale, zero_point)))`` -- torch's vectorized quantizer fuses the add;
* per channel: ``q = clamp(rint(w * (1/scale) + zero_point))`` in float32, no fusion (integer or float zero point);
* dequantize:  ``(q.float() - zero_point) * scale``;
* values are clamped to the observer's ``quant_min/quant_max`` when the qparams dict carries them (fxquant's
  convert passes them), else to the dtype's range (torch.ao's dicts, as ``torch.quantize_per_*`` does);
  ``quint4x2`` weights keep one 0..15 value per uint8 byte.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from fxquant._dtypes import dtype_range, is_float_qdtype, is_integer_qdtype, normalize_dtype

__all__ = ["WeightSpec", "parse_weight_qparams", "quantize_weight", "dequantize_weight", "ReferenceWeightMixin"]

# qscheme name -> granularity ("none" keeps the weight in float)
_GRANULARITY = {
    "None": "none",
    "per_tensor_affine": "per_tensor",
    "per_tensor_symmetric": "per_tensor",
    "per_channel_affine": "per_channel",
    "per_channel_symmetric": "per_channel",
    "per_channel_affine_float_qparams": "per_channel",
}
# symmetric schemes store the same integers as affine ones (torch.ao's get_qparam_dict does this mapping too)
_CANONICAL = {"per_tensor_symmetric": "per_tensor_affine", "per_channel_symmetric": "per_channel_affine"}


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """How one weight is quantized: qscheme name, plain dtype, clamp range, channel axis, float dtype."""

    qscheme_name: str  # "None", "per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams"
    dtype: torch.dtype  # plain storage dtype
    quant_min: int | None  # None for float targets
    quant_max: int | None
    axis: int = 0
    float_dtype: torch.dtype = torch.float32  # dtype get_weight() returns

    @property
    def granularity(self) -> str:
        return _GRANULARITY[self.qscheme_name]

    @property
    def qscheme(self) -> torch.qscheme | None:
        return None if self.qscheme_name == "None" else getattr(torch, self.qscheme_name)

    def to_state(self) -> dict[str, Any]:
        """Plain (str / int) form for the state dict."""
        state = dataclasses.asdict(self)
        state["dtype"] = str(self.dtype).removeprefix("torch.")
        state["float_dtype"] = str(self.float_dtype).removeprefix("torch.")
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> WeightSpec:
        fields = dict(state)
        fields["dtype"] = getattr(torch, fields["dtype"])
        fields["float_dtype"] = getattr(torch, fields["float_dtype"])
        return cls(**fields)


def _scheme_name(qscheme: Any, where: str) -> str:
    name = "None" if qscheme is None else str(qscheme).removeprefix("torch.")
    if name not in _GRANULARITY:
        raise ValueError(f"{where}: weight qscheme {qscheme!r} is not supported; use one of "
                         f"{sorted(n for n in _GRANULARITY if n != 'None')} or None (keep the weight float)")
    return _CANONICAL.get(name, name)


def _as_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=dtype).clone()
    return torch.tensor(value, dtype=dtype, device=device)


def parse_weight_qparams(qparams: Mapping[str, Any] | None, weight: torch.Tensor,
                         where: str) -> tuple[WeightSpec, torch.Tensor, torch.Tensor]:
    """Validate torch.ao's weight-qparams dict (``qscheme, dtype, scale, zero_point, axis``) for ``weight``.

    ``None`` means per-tensor int8 with scale 1 and zero point 0 (a placeholder, e.g. before ``load_state_dict``).
    Returns the spec, the float32 scale and the zero point (int64, or float32 for float qparams).
    """
    if qparams is None:
        qparams = {"qscheme": torch.per_tensor_affine, "dtype": torch.int8, "scale": 1.0, "zero_point": 0}
    if not isinstance(qparams, Mapping) or "dtype" not in qparams or "qscheme" not in qparams:
        raise TypeError(f"{where}: weight_qparams must be a dict with keys 'qscheme', 'dtype', 'scale', "
                        f"'zero_point' (and 'axis' per channel), got {qparams!r}")
    name = _scheme_name(qparams["qscheme"], where)
    raw_dtype = qparams["dtype"]
    float_dtype = weight.dtype if weight.is_floating_point() else torch.float32
    if name == "None" or raw_dtype in (None, torch.float32, torch.float64) or raw_dtype == float_dtype:
        spec = WeightSpec("None", float_dtype, None, None, 0, float_dtype)
        return spec, torch.ones((), device=weight.device), torch.zeros((), dtype=torch.long, device=weight.device)
    spec = _make_spec(name, raw_dtype, qparams, weight, float_dtype, where)
    for key in ("scale", "zero_point"):
        if key not in qparams:
            raise ValueError(f"{where}: weight_qparams for qscheme {name} needs '{key}'")
    zp_dtype = torch.float32 if name == "per_channel_affine_float_qparams" else torch.long
    scale = _as_tensor(qparams["scale"], torch.float32, weight.device)
    zero_point = _as_tensor(qparams["zero_point"], zp_dtype, weight.device)
    _check_qparam_shapes(spec, scale, zero_point, weight, where)
    return spec, scale, zero_point


def _weight_range(raw_dtype: Any, qparams: Mapping[str, Any]) -> tuple[int, int]:
    """The clamp range: the observer's ``quant_min/quant_max`` when the dict carries them (fxquant's convert does),
    else the dtype's (torch.ao's dicts). Better than torch.ao for narrow ranges: a 4-bit (-8..7) symmetric weight at
    its observed extreme rounds to 8 and torch.ao stores that 8; fxquant clamps it to 7, as training did."""
    qmin, qmax = dtype_range(raw_dtype)
    lo, hi = qparams.get("quant_min"), qparams.get("quant_max")
    if isinstance(lo, int) and isinstance(hi, int) and qmin <= lo < hi <= qmax:
        return lo, hi
    return qmin, qmax


def _make_spec(name: str, raw_dtype: Any, qparams: Mapping[str, Any], weight: torch.Tensor,
               float_dtype: torch.dtype, where: str) -> WeightSpec:
    dtype = normalize_dtype(raw_dtype)
    if is_integer_qdtype(raw_dtype):
        qmin, qmax = _weight_range(raw_dtype, qparams)
    elif is_float_qdtype(dtype):
        qmin = qmax = None
    else:
        raise ValueError(f"{where}: weight dtype {raw_dtype} is not a quantized dtype; use int8, uint8, int32, "
                         f"quint4x2, float16, bfloat16 or float8")
    axis = 0
    if _GRANULARITY[name] == "per_channel":
        if "axis" not in qparams:
            raise ValueError(f"{where}: per-channel weight_qparams need 'axis'")
        axis = int(qparams["axis"])
        if not -weight.dim() <= axis < weight.dim():
            raise ValueError(f"{where}: weight axis {axis} is out of range for a {weight.dim()}-d weight")
        axis %= weight.dim()
    return WeightSpec(name, dtype, qmin, qmax, axis, float_dtype)


def _check_qparam_shapes(spec: WeightSpec, scale: torch.Tensor, zero_point: torch.Tensor,
                         weight: torch.Tensor, where: str) -> None:
    if spec.granularity == "per_tensor":
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(f"{where}: per-tensor weight qparams need one scale and zero point, got "
                             f"{scale.numel()} and {zero_point.numel()}")
        return
    channels = weight.shape[spec.axis]
    if scale.shape != (channels,) or zero_point.shape != (channels,):
        raise ValueError(f"{where}: per-channel weight qparams need shape ({channels},) along axis {spec.axis}, got "
                         f"scale {tuple(scale.shape)} and zero_point {tuple(zero_point.shape)}")


def _broadcast(values: torch.Tensor, spec: WeightSpec, ndim: int) -> torch.Tensor:
    if spec.granularity == "per_tensor":
        return values.reshape(())
    shape = [1] * ndim
    shape[spec.axis] = -1
    return values.reshape(shape)


def quantize_weight(weight: torch.Tensor, spec: WeightSpec, scale: torch.Tensor,
                    zero_point: torch.Tensor) -> torch.Tensor:
    """Quantize a float weight exactly as torch's CPU ``quantize_per_tensor / per_channel`` does."""
    if spec.granularity == "none":
        return weight.detach().clone()
    if weight.is_meta:  # a module being built on the meta device: only the shape and dtype matter (and meta ops
        return torch.empty(weight.shape, dtype=spec.dtype, device="meta")  # run ~100x slower than real ones)
    w = weight.detach().float()
    s = _broadcast(scale, spec, w.dim())
    zp = _broadcast(zero_point, spec, w.dim())
    if spec.quant_min is None:  # float target: scale, clamp to the finite range, cast
        info = torch.finfo(spec.dtype)
        return (w / s).clamp(info.min, info.max).to(spec.dtype)
    inv = torch.reciprocal(s)
    if spec.granularity == "per_tensor":  # fused multiply-add, emulated in float64 then rounded to float32
        pre = (w.double() * inv.double() + zp.double()).float()
    else:
        pre = torch.mul(w, inv).add_(zp)  # (a new tensor, then in place: the same two roundings as w * inv + zp)
    return pre.round_().clamp_(spec.quant_min, spec.quant_max).to(spec.dtype)


def dequantize_weight(q: torch.Tensor, spec: WeightSpec, scale: torch.Tensor,
                      zero_point: torch.Tensor) -> torch.Tensor:
    """Float weight from its quantized form: ``(q - zero_point) * scale`` in float32, then ``spec.float_dtype``."""
    if spec.granularity == "none":
        return q
    s = _broadcast(scale, spec, q.dim())
    if spec.quant_min is None:
        out = q.float() * s
    else:
        out = (q.float() - _broadcast(zero_point, spec, q.dim())) * s
    return out if spec.float_dtype == torch.float32 else out.to(spec.float_dtype)
