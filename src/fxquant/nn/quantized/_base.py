"""Shared machinery of the lowered (int8-kernel) modules.

A lowered module holds only plain tensors in its state dict (int8 weight, float scales, int64 zero points, float
bias, 0-d activation qparams) plus ``_extra_state`` of strings and ints. Kernel state that cannot be saved (onednn
prepacked weights, a cached float weight) lives in ``_kernel_cache``; it is built on first use, dropped on
``load_state_dict`` / ``copy.deepcopy`` / pickling, and rebuilt lazily.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fxquant._dtypes import dtype_range, normalize_dtype
from fxquant.kernels.portable import BINARY_POST_OPS, UNARY_POST_OPS, OutSpec
from fxquant.nn.quantized.reference._weight import WeightSpec, dequantize_weight

__all__ = ["QuantizedModuleBase", "ActSpec", "act_spec"]


@dataclasses.dataclass(frozen=True)
class ActSpec:
    """Plain dtype and value range of an activation (input, output or the other operand of an add)."""

    dtype: torch.dtype
    quant_min: int
    quant_max: int

    def to_state(self) -> list[Any]:
        return [str(self.dtype).removeprefix("torch."), self.quant_min, self.quant_max]

    @classmethod
    def from_state(cls, state: list[Any]) -> ActSpec:
        return cls(getattr(torch, state[0]), int(state[1]), int(state[2]))

    @property
    def out(self) -> OutSpec:
        return OutSpec(self.dtype, self.quant_min, self.quant_max)


def act_spec(dtype: torch.dtype, quant_min: int | None, quant_max: int | None, where: str) -> ActSpec:
    """Validate an activation dtype (legacy names accepted) and range (default: the dtype's full range)."""
    plain = normalize_dtype(dtype)
    if plain is not None and plain.is_floating_point:
        return ActSpec(plain, 0, 0)
    if plain not in (torch.uint8, torch.int8):
        raise ValueError(f"{where}: activation dtype {dtype} is not supported; use torch.uint8 or torch.int8 "
                         f"(or a float dtype for a float output)")
    lo, hi = dtype_range(plain)
    qmin, qmax = lo if quant_min is None else int(quant_min), hi if quant_max is None else int(quant_max)
    if not lo <= qmin < qmax <= hi:
        raise ValueError(f"{where}: quant range [{qmin}, {qmax}] does not fit {plain} ([{lo}, {hi}])")
    return ActSpec(plain, qmin, qmax)


def _scalar(value: Any, dtype: torch.dtype, name: str, where: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"{where}: {name} is required")
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
    if t.numel() != 1:
        raise ValueError(f"{where}: {name} must be a single number, got shape {tuple(t.shape)}")
    return t.reshape(()).to(dtype)


_OPTIONAL_BUFFERS = ("bias", "output_scale", "output_zero_point", "other_scale", "other_zero_point",
                     "pre_activation_scale", "pre_activation_zero_point", "activation_table")


class QuantizedModuleBase(nn.Module):
    """uint8 (or int8) input with its scale / zero point -> quantized or float output, via a chosen kernel."""

    _OP: str  # kernel-rule key in fxquant.kernels.x86.RULES
    post_op: str
    weight_spec: WeightSpec
    input_spec: ActSpec
    output_spec: ActSpec
    other_spec: ActSpec | None

    def __init__(self) -> None:
        super().__init__()
        self._kernel_cache: dict[str, Any] = {}
        self.pre_activation_range: tuple[int, int] | None = None

    def set_pre_activation(self, scale: float, zero_point: int, quant_min: int, quant_max: int,
                           table: torch.Tensor) -> None:
        """Record the qparams and range of this module's own output before a folded activation (``post_op``
        hardswish / silu) and the 256-entry table that maps it to the final output: a kernel that rounds there
        first applies the table after it, as the reference model does."""
        self.register_buffer("pre_activation_scale", torch.tensor(float(scale)))
        self.register_buffer("pre_activation_zero_point", torch.tensor(int(zero_point)))
        self.register_buffer("activation_table", table.detach().clone())
        self.pre_activation_range = (int(quant_min), int(quant_max))
        self._kernel_cache = {}

    def _init_quant(self, weight_spec: WeightSpec, weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    bias: torch.Tensor | None, act: Mapping[str, Any]) -> None:
        """Register the buffers; ``act`` holds input/output/other scale, zero point and spec."""
        where = self._get_name()
        post_op = act.get("post_op", "none")
        if post_op not in UNARY_POST_OPS and post_op not in BINARY_POST_OPS:
            raise ValueError(f"{where}: post_op {post_op!r} is not supported; use one of "
                             f"{sorted(UNARY_POST_OPS) + sorted(BINARY_POST_OPS)}")
        self.post_op, self.weight_spec = post_op, weight_spec
        self.input_spec, self.output_spec = act["input_spec"], act["output_spec"]
        self.other_spec = act.get("other_spec") if post_op in BINARY_POST_OPS else None
        for name, value in zip(("weight_int", "weight_scale", "weight_zero_point"), weight):
            self.register_buffer(name, value.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        names = [("input", True), ("output", not self.output_spec.dtype.is_floating_point),
                 ("other", self.other_spec is not None)]
        for prefix, needed in names:
            scale = _scalar(act.get(f"{prefix}_scale"), torch.float32, f"{prefix}_scale", where) if needed else None
            zp = _scalar(act.get(f"{prefix}_zero_point"), torch.int64, f"{prefix}_zero_point", where) if needed \
                else None
            self.register_buffer(f"{prefix}_scale", scale)
            self.register_buffer(f"{prefix}_zero_point", zp)
        self._kernel_cache: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ kernel state
    def _cached(self, key: str, build: Any) -> Any:
        """``build()`` once per key (e.g. a prepacked weight); rebuilt after load / copy."""
        if torch.compiler.is_compiling():
            return build()
        if key not in self._kernel_cache:
            self._kernel_cache[key] = build()
        return self._kernel_cache[key]

    def float_weight(self) -> torch.Tensor:
        """Dequantized float weight (cached in eager mode)."""
        return self._cached("float_weight", lambda: dequantize_weight(
            self.weight_int, self.weight_spec, self.weight_scale, self.weight_zero_point))

    def _weight_scale_per_channel(self, channels: int) -> torch.Tensor:
        return self.weight_scale.float().reshape(-1).expand(channels).contiguous()

    def _symmetric_int8_weight(self) -> bool:
        if torch.compiler.is_compiling():  # a data-dependent test; traced graphs use the float path anyway
            return False
        return (self.weight_spec.dtype == torch.int8 and self.weight_spec.granularity != "none"
                and (self.weight_spec.granularity == "per_tensor" or self.weight_spec.axis == 0)
                and not bool(self.weight_zero_point.any()))

    def _onednn_ok(self) -> bool:
        """Dtypes and zero points onednn computes exactly (the 0..127 question is separate: see x86.py)."""
        if torch.compiler.is_compiling():
            return False
        return self._cached("onednn_ok", lambda: self._symmetric_int8_weight() and
                            self.input_spec.dtype == torch.uint8 and
                            self.output_spec.dtype in (torch.uint8, torch.float32) and
                            (self.other_spec is None or self.other_spec.dtype == torch.uint8))

    def _other(self, other: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.other_spec is None:
            return None
        if other is None:
            raise ValueError(f"{self._get_name()}: post_op {self.post_op!r} adds a second operand; "
                             f"call forward(x, other) with the quantized tensor to add")
        return other, self.other_scale, self.other_zero_point

    # ------------------------------------------------------------------------------------------ persistence
    def get_extra_state(self) -> dict[str, Any]:
        state = {"post_op": self.post_op, "weight_spec": self.weight_spec.to_state(),
                 "input_spec": self.input_spec.to_state(), "output_spec": self.output_spec.to_state(),
                 "other_spec": None if self.other_spec is None else self.other_spec.to_state()}
        if self.pre_activation_range is not None:
            state["pre_activation_range"] = list(self.pre_activation_range)
        return state

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "weight_spec" not in state:
            raise ValueError(f"{self._get_name()}: unexpected _extra_state {state!r}; expected one saved by an "
                             f"fxquant lowered module")
        self.post_op = state["post_op"]
        self.weight_spec = WeightSpec.from_state(state["weight_spec"])
        self.input_spec = ActSpec.from_state(state["input_spec"])
        self.output_spec = ActSpec.from_state(state["output_spec"])
        self.other_spec = None if state["other_spec"] is None else ActSpec.from_state(state["other_spec"])
        pre = state.get("pre_activation_range")
        self.pre_activation_range = None if pre is None else (int(pre[0]), int(pre[1]))
        for name in _OPTIONAL_BUFFERS:  # a bare module loading a state dict: absent optional buffers are None
            if name not in self._buffers:
                self.register_buffer(name, None)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key, saved in state_dict.items():  # adopt the saved buffers' shapes / dtypes (a bare module has none)
            name = key[len(prefix):]
            if not key.startswith(prefix) or "." in name or not isinstance(saved, torch.Tensor):
                continue
            current = self._buffers.get(name)
            if current is None or saved.shape != current.shape or saved.dtype != current.dtype:
                self._buffers[name] = torch.empty_like(saved)
        self._kernel_cache = {}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_kernel_cache"] = {}  # onednn packed weights are neither copyable nor picklable
        return state

    def extra_repr(self) -> str:
        if "weight_spec" not in self.__dict__:
            return f"{self._geometry_repr()}, <not built: use from_reference or load_state_dict>"
        parts = [self._geometry_repr(), f"weight={self.weight_spec.qscheme_name}:"
                 f"{str(self.weight_spec.dtype).removeprefix('torch.')}"]
        parts.append(f"input=({float(self.input_scale):.6g}, {int(self.input_zero_point)}, "
                     f"{str(self.input_spec.dtype).removeprefix('torch.')})")
        if self.output_scale is not None:
            parts.append(f"output=({float(self.output_scale):.6g}, {int(self.output_zero_point)}, "
                         f"{str(self.output_spec.dtype).removeprefix('torch.')})")
        else:
            parts.append(f"output={str(self.output_spec.dtype).removeprefix('torch.')}")
        if self.post_op != "none":
            parts.append(f"post_op={self.post_op}")
        return ", ".join(p for p in parts if p)

    def _geometry_repr(self) -> str:
        return ""

    def _get_name(self) -> str:
        return f"Quantized{type(self).__name__}"
