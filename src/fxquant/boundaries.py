"""Quantized model inputs and outputs (PrepareCustomConfig ``input_quantized_indexes`` / ``output_quantized_indexes``).

torch.ao passes quantized tensors across such a boundary, and the tensor carries its scale. fxquant's tensors are plain
integers, so the converted model keeps the scale and zero point itself, as buffers of its ``fxquant_boundaries``
submodule (:class:`QuantizedBoundaries`), and :func:`boundary_qparams` hands them to the code around the model::

    cfg = fxquant.PrepareCustomConfig().set_input_quantized_indexes([0]).set_output_quantized_indexes([0])
    prepared = fxquant.prepare_fx(model, qconfig_mapping, (x,), prepare_custom_config=cfg)
    prepared(x)                                  # calibration runs on float data, as in torch.ao
    quantized = fxquant.convert_fx(prepared)
    io = fxquant.boundary_qparams(quantized)
    q_out = quantized(io.inputs[0].quantize(x))  # uint8 in, uint8 out
    y = io.outputs[0].dequantize(q_out)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch
from torch import Tensor, nn

__all__ = ["QParamsInfo", "BoundaryQParams", "boundary_qparams", "QuantizedBoundaries", "check_quantized_input",
           "BOUNDARIES_ATTR", "OutputKey"]

BOUNDARIES_ATTR = "fxquant_boundaries"  # the submodule of a converted model holding the boundary qparams
OutputKey = Union[int, str, tuple]  # position in the returned value: out[k], or out[k0][k1]... for a tuple path


@dataclass(frozen=True)
class QParamsInfo:
    """Per-tensor qparams of one quantized model input or output.

    ``quantize`` / ``dequantize`` compute exactly what the converted model's own quantize / dequantize ops do
    (``clamp(round(x / scale) + zero_point, quant_min, quant_max)``, round half to even; ``(q - zero_point) * scale``).
    """

    scale: float
    zero_point: int
    dtype: torch.dtype
    quant_min: int
    quant_max: int
    name: str = ""  # the placeholder (input) or the graph node (output) it belongs to

    def quantize(self, x: Tensor) -> Tensor:
        """Float tensor -> the integer tensor (``dtype``) the model takes at this input."""
        from .ops import quantize_per_tensor

        return quantize_per_tensor(x, self.scale, self.zero_point, self.quant_min, self.quant_max, self.dtype)

    def dequantize(self, q: Tensor) -> Tensor:
        """Integer tensor returned at this output -> float32."""
        from .ops import dequantize_per_tensor

        return dequantize_per_tensor(q, self.scale, self.zero_point, self.quant_min, self.quant_max, self.dtype)


@dataclass(frozen=True)
class BoundaryQParams:
    """qparams of a converted model's quantized inputs (by positional index) and outputs (by :data:`OutputKey`:
    ``0`` for a model returning one tensor, ``i`` for ``out[i]``, a tuple ``(i, j)`` for ``out[i][j]``)."""

    inputs: Mapping[int, QParamsInfo] = field(default_factory=dict)
    outputs: Mapping[OutputKey, QParamsInfo] = field(default_factory=dict)


def check_quantized_input(x: Any, dtype: torch.dtype, index: int, name: str) -> Any:
    """The converted graph's first op on a quantized input: refuse anything but an integer tensor of ``dtype``."""
    if getattr(x, "dtype", None) is not dtype:
        got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(
            f"input {index} ({name!r}) of this quantized model is declared quantized "
            f"(PrepareCustomConfig.set_input_quantized_indexes) and takes {dtype} integers, got {got}. Quantize it "
            f"first: q = fxquant.boundary_qparams(model).inputs[{index}].quantize(x)")
    return x


class QuantizedBoundaries(nn.Module):
    """Holds the scale / zero point buffers of a converted model's quantized inputs and outputs.

    Buffers ``input_<i>_scale`` / ``input_<i>_zero_point`` for input ``i`` and ``output_<k>_scale`` / ... for the
    ``k``-th declared output leaf; ``inputs`` / ``outputs`` map each index / key to ``(buffer prefix, node name,
    dtype, quant_min, quant_max, path in the returned value)``. Read them with :func:`boundary_qparams`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[int, tuple] = {}
        self.outputs: dict[Any, tuple] = {}

    def add(self, side: str, key: Any, name: str, scale: Any, zero_point: Any, dtype: torch.dtype, quant_min: int,
            quant_max: int, path: tuple = ()) -> str:
        """Register the buffers of one boundary value; returns their prefix (``input_0``, ``output_1``, ...)."""
        table = self.inputs if side == "input" else self.outputs
        prefix = f"input_{key}" if side == "input" else f"output_{len(self.outputs)}"
        self.register_buffer(f"{prefix}_scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone())
        self.register_buffer(f"{prefix}_zero_point", torch.as_tensor(zero_point).detach().clone())
        table[key] = (prefix, name, dtype, int(quant_min), int(quant_max), tuple(path))
        return prefix

    def info(self, entry: tuple) -> QParamsInfo:
        prefix, name, dtype, qmin, qmax = entry[:5]
        return QParamsInfo(float(getattr(self, f"{prefix}_scale")), int(getattr(self, f"{prefix}_zero_point")),
                           dtype, qmin, qmax, name)

    def extra_repr(self) -> str:
        return f"inputs={sorted(self.inputs)}, outputs={list(self.outputs)}"


def boundary_qparams(model: nn.Module) -> BoundaryQParams:
    """The qparams of ``model``'s quantized inputs and outputs (a model from convert_fx / convert_to_reference_fx
    prepared with ``input_quantized_indexes`` / ``output_quantized_indexes``); empty mappings when it has none.

    Raises ValueError for a prepared model that declares such indexes: its qparams exist once it is converted.
    """
    holder = getattr(model, BOUNDARIES_ATTR, None)
    if isinstance(holder, QuantizedBoundaries):
        return BoundaryQParams({k: holder.info(e) for k, e in holder.inputs.items()},
                               {k: holder.info(e) for k, e in holder.outputs.items()})
    from .passes.common import get_state

    state = get_state(model)
    cfg = getattr(state, "prepare_custom_config", None)
    if getattr(cfg, "input_quantized_indexes", None) or getattr(cfg, "output_quantized_indexes", None):
        raise ValueError("boundary_qparams: this model is prepared, not converted; its quantized inputs / outputs "
                         "get their qparams at convert: call fxquant.convert_fx(model) (or convert_to_reference_fx) "
                         "after calibration, then boundary_qparams on the result")
    return BoundaryQParams()
