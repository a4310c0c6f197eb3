"""Reference quantized LSTM / GRU (weights quantized, float recurrence; used for dynamic quantization).

Every ``weight_*`` of the float module becomes buffers ``<name>_int / <name>_scale / <name>_zero_point``; biases
stay float parameters. ``from_float(mod, weight_qparams_dict)`` takes torch.ao's dict ``{weight name: qparams}``
(an ``"is_decomposed"`` key is ignored). The forward is the float ``_VF.lstm`` / ``_VF.gru`` on the dequantized
weights, so it equals torch.ao's reference module bit for bit.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from fxquant.nn.quantized.reference._module import ReferenceWeightMixin

__all__ = ["LSTM", "GRU"]


class _RefRNNMixin(ReferenceWeightMixin):
    """Shared storage and forward plumbing for the reference recurrent modules."""

    _IS_REFERENCE = True
    _MODE: str
    _KERNEL: Any
    _FLOAT_CLS: type[nn.RNNBase]

    def _init_ref(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                  weight_qparams_dict: Mapping[str, Any] | None) -> None:
        self._FLOAT_CLS.__init__(self, *args, **kwargs)
        qparams = dict(weight_qparams_dict or {})
        for name in self._weight_names():
            self._attach_weight(name, self._parameters[name], qparams.get(name))  # type: ignore[arg-type]
        self._init_flat_weights()

    def _weight_names(self) -> list[str]:
        return [n for n in self._flat_weights_names if n.startswith("weight")]  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        specs = self.__dict__.get("_weight_specs")
        if specs is not None and name in specs:
            return self._dequantized(name)
        return super().__getattr__(name)  # type: ignore[misc]

    def _init_flat_weights(self) -> None:
        # float code only reads dtype / device from _flat_weights: keep empty placeholders, not float copies
        specs = self.__dict__.get("_weight_specs", {})
        flat = []
        for name in self._flat_weights_names:  # type: ignore[attr-defined]
            if name in specs:
                flat.append(getattr(self, name + "_int").new_empty(0, dtype=specs[name].float_dtype))
            else:
                flat.append(self._parameters.get(name))  # type: ignore[attr-defined]
        self._flat_weights = flat
        self._flat_weight_refs: list[Any] = [None] * len(flat)

    def _update_flat_weights(self) -> None:
        pass

    def get_weight(self) -> torch.Tensor:  # no single "weight": point at the per-name accessors
        raise AttributeError(f"{self._get_name()} has several weights; use get_flat_weights() or "
                             f"module.<name> (e.g. weight_ih_l0) for one dequantized weight")

    def get_flat_weights(self) -> list[torch.Tensor | None]:
        """Dequantized weights and float biases in ``_flat_weights_names`` order (what ``_VF`` expects)."""
        return [getattr(self, name) if name in self._weight_specs else self._parameters.get(name)  # type: ignore
                for name in self._flat_weights_names]  # type: ignore[attr-defined]

    def _zero_state(self, data: torch.Tensor, max_batch: int) -> Any:
        m: Any = self
        layers = m.num_layers * (2 if m.bidirectional else 1)
        h_size = m.proj_size if getattr(m, "proj_size", 0) > 0 else m.hidden_size
        h = torch.zeros(layers, max_batch, h_size, dtype=data.dtype, device=data.device)
        if self._MODE != "LSTM":
            return h
        return h, torch.zeros(layers, max_batch, m.hidden_size, dtype=data.dtype, device=data.device)

    def forward(self, input: Any, hx: Any = None) -> tuple[Any, Any]:
        m: Any = self
        lstm = self._MODE == "LSTM"
        squeeze = (lambda t: t.squeeze(1)) if not lstm else (lambda t: (t[0].squeeze(1), t[1].squeeze(1)))
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_idx, unsorted_idx = input
            batched, max_batch = True, int(batch_sizes[0])
        else:
            data, batch_sizes, sorted_idx, unsorted_idx = input, None, None, None
            batched = input.dim() == 3
            if not batched:
                data = data.unsqueeze(1 if not m.batch_first else 0)
                hx = None if hx is None else (hx.unsqueeze(1) if not lstm else (hx[0].unsqueeze(1),
                                                                                 hx[1].unsqueeze(1)))
            max_batch = data.size(0 if m.batch_first else 1)
        hx = self._zero_state(data, max_batch) if hx is None else m.permute_hidden(hx, sorted_idx)
        m.check_forward_args(data, hx, batch_sizes)
        common = (self.get_flat_weights(), m.bias, m.num_layers, float(m.dropout), m.training, m.bidirectional)
        if batch_sizes is None:
            result = type(self)._KERNEL(data, hx, *common, m.batch_first)
        else:
            result = type(self)._KERNEL(data, batch_sizes, hx, *common)
        output, hidden = result[0], (tuple(result[1:]) if lstm else result[1])
        if isinstance(input, PackedSequence):
            return PackedSequence(output, batch_sizes, sorted_idx, unsorted_idx), m.permute_hidden(hidden,
                                                                                                  unsorted_idx)
        if not batched:
            output, hidden = output.squeeze(1 if not m.batch_first else 0), squeeze(hidden)
        return output, hidden

    @classmethod
    def from_float(cls, mod: nn.Module, weight_qparams_dict: Mapping[str, Any],
                   keep_original_weights: bool = False) -> Any:
        """Quantize every weight of the float ``mod`` with ``weight_qparams_dict[name]`` (torch.ao's dict)."""
        float_cls = cls._FLOAT_CLS
        if not isinstance(mod, float_cls):
            raise TypeError(f"{cls.__name__}.from_float expects an nn.{float_cls.__name__}, got {type(mod).__name__}")
        fields = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
        kwargs = {f: getattr(mod, f) for f in fields}
        if cls._MODE == "LSTM":
            kwargs["proj_size"] = mod.proj_size
        ref = cls(**kwargs, device="meta", dtype=mod.weight_ih_l0.dtype)
        for name in ref._weight_names():
            if name not in weight_qparams_dict:
                raise ValueError(f"{ref._get_name()}.from_float: weight_qparams_dict has no entry for {name!r}; "
                                 f"keys are {sorted(weight_qparams_dict)}")
            ref._attach_weight(name, getattr(mod, name), weight_qparams_dict[name], keep_original_weights)
        for name in ref._flat_weights_names:
            if name.startswith("bias"):
                setattr(ref, name, nn.Parameter(getattr(mod, name).detach().clone()))
        ref._init_flat_weights()
        return ref


class LSTM(_RefRNNMixin, nn.LSTM):
    """Reference quantized LSTM (``proj_size`` supported)."""

    _MODE = "LSTM"
    _KERNEL = _VF.lstm
    _FLOAT_CLS = nn.LSTM

    def __init__(self, *args: Any, weight_qparams_dict: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._init_ref(args, kwargs, weight_qparams_dict)


class GRU(_RefRNNMixin, nn.GRU):
    """Reference quantized GRU."""

    _MODE = "GRU"
    _KERNEL = _VF.gru
    _FLOAT_CLS = nn.GRU

    def __init__(self, *args: Any, weight_qparams_dict: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._init_ref(args, kwargs, weight_qparams_dict)
