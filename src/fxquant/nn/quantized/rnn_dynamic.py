"""Dynamically quantized LSTM / GRU with torch.ao's numerics: int8 weights, activations quantized at run time.

torch.ao's converted dynamic LSTM / GRU quantize every activation that meets a weight, per tensor, at run time: a
layer's input (the whole sequence at once) and, at each step, the hidden state (over the rows of that step); the
products are exact int32, the gates float. Its reference module (and fxquant's
:class:`fxquant.nn.quantized.reference.LSTM`) instead runs the recurrence in float on dequantized weights. These
lowered modules compute what torch.ao's converted modules compute, so a migrated model keeps its outputs; they differ
from the reference graph by the hidden state's rounding at each step (``tests/test_rnn_dynamic.py`` measures both).
Activation qparams are those of fxquant's observers (:func:`fxquant.kernels.dynamic.affine_qparams`) over
``[quant_min, quant_max]`` (0..127 for x86's ``reduce_range``).

Kernels: FBGEMM through fxquant's native library (:mod:`fxquant.kernels.native`): one call for a layer's input
projection (both directions), one per direction for the recurrence. While tracing for ``torch.export`` the same
arithmetic runs in aten ops step by step. Eager calls without the native library (no compiler, another CPU)
compute what the reference graph computes instead -- the input quantized at run time, then the float recurrence on
the dequantized weights -- since the step-by-step aten form costs 3-30x fp32's time
(``bench_kernels.py --only native``, the ``lstm_dynamic`` rows)::

    lowered = DynamicLSTM.from_reference(ref_lstm, quant_min=0, quant_max=127)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from fxquant.kernels import dynamic, native, portable, x86
from fxquant.nn.quantized import reference as ref
from fxquant.nn.quantized._base import act_spec
from fxquant.nn.quantized._lowering import dynamic_qparams
from fxquant.nn.quantized.rnn import WeightCache

__all__ = ["DynamicLSTM", "DynamicGRU", "supports"]

_State = tuple[torch.Tensor, torch.Tensor | None]


def _suffix(layer: int, direction: int) -> str:
    """The parameter-name suffix of one layer and direction (``_l1``, ``_l1_reverse``), as in ``nn.LSTM``."""
    return f"_l{layer}" + ("_reverse" if direction else "")


def supports(module: Any) -> str:
    """Why ``module`` (a reference LSTM / GRU) cannot become a dynamic one, or ``""``."""
    if type(module) not in (ref.LSTM, ref.GRU):
        return f"{type(module).__name__} is not a reference LSTM / GRU"
    if getattr(module, "proj_size", 0) > 0:
        return "LSTM with proj_size (no dynamic kernel for the projection: the float recurrence runs)"
    for name, spec in module._weight_specs.items():
        if spec.dtype != torch.int8 or spec.granularity not in ("per_tensor", "per_channel") or spec.axis != 0:
            return f"{name} is not an int8 per-tensor / per-output-channel weight ({spec.qscheme_name} {spec.dtype})"
    return ""


class _DynamicRNN(WeightCache):
    """Shared plumbing: state handling of ``nn.LSTM`` / ``nn.GRU``, the two kernels, cached weight plans."""

    _GATES: int
    _REF: type
    _kernel_cache: dict[Any, Any]
    quant_min: int
    quant_max: int

    @classmethod
    def from_reference(cls, module: Any, quant_min: int = 0, quant_max: int = 127) -> Any:
        """A lowered module sharing ``module``'s weights (the reference module is consumed)."""
        if type(module) is not cls._REF:
            raise TypeError(f"{cls.__name__}.from_reference expects {cls._REF.__name__}, got {type(module).__name__}")
        reason = supports(module)
        if reason:
            raise ValueError(f"{cls.__name__}.from_reference: {reason}")
        if not 0 <= quant_min < quant_max <= 255:
            raise ValueError(f"{cls.__name__}: activation range [{quant_min}, {quant_max}] must be uint8 (0..255)")
        lowered = cls.__new__(cls)
        lowered.__dict__.update(module.__dict__)
        lowered.__dict__["_kernel_cache"] = {}
        lowered.quant_min, lowered.quant_max = int(quant_min), int(quant_max)
        return lowered

    # ----------------------------------------------------------------------------------------------- plumbing
    def forward(self, input: Any, hx: Any = None) -> tuple[Any, Any]:
        data = input.data if isinstance(input, PackedSequence) else input
        path = self._path(data)
        if path == "float":
            return self._float_forward(input, hx)
        m: Any = self
        lstm = self._GATES == 4
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_idx, unsorted_idx = input
            sizes = [int(b) for b in batch_sizes]
            rows, batched = data, True
        else:
            sorted_idx = unsorted_idx = None
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1 if not m.batch_first else 0)
            if not batched and hx is not None:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if lstm else hx.unsqueeze(1)
            time_major = x.transpose(0, 1) if m.batch_first else x
            sizes = [int(time_major.shape[1])] * int(time_major.shape[0])
            rows = time_major.reshape(-1, x.shape[-1])
        largest = sizes[0] if sizes else 0
        if hx is None:
            zeros = rows.new_zeros(m.num_layers * (2 if m.bidirectional else 1), largest, m.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        else:
            hx = m.permute_hidden(hx, sorted_idx)
        m.check_forward_args(rows if isinstance(input, PackedSequence) else x, hx,
                             batch_sizes if isinstance(input, PackedSequence) else None)
        h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
        out, h_n, c_n = self._run(path, rows.float(), sizes, h0.float(), None if c0 is None else c0.float())
        out, h_n = out.to(rows.dtype), h_n.to(rows.dtype)
        hidden: Any = (h_n, c_n.to(rows.dtype)) if lstm else h_n  # type: ignore[union-attr]
        if isinstance(input, PackedSequence):
            return PackedSequence(out, batch_sizes, sorted_idx, unsorted_idx), m.permute_hidden(hidden, unsorted_idx)
        out = out.reshape(len(sizes), largest, -1)
        out = out.transpose(0, 1) if m.batch_first else out
        if not batched:
            out = out.squeeze(1 if not m.batch_first else 0)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if lstm else hidden.squeeze(1)
        return out, hidden

    def _run(self, path: str, rows: torch.Tensor, sizes: list[int], h0: torch.Tensor,
             c0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m: Any = self
        directions = 2 if m.bidirectional else 1
        native_run = path == "native" and sizes and rows.shape[0] > 0
        layer_fn = self._native_layer if native_run else self._aten_layer
        h_out, c_out = [], []
        x = rows
        for layer in range(m.num_layers):
            if layer and m.training and m.dropout > 0:
                x = F.dropout(x, m.dropout, True)
            states = [(h0[layer * directions + d], None if c0 is None else c0[layer * directions + d])
                      for d in range(directions)]
            x, finals = layer_fn(layer, x, sizes, states)
            h_out += [f[0] for f in finals]
            c_out += [f[1] for f in finals]
        h_n = torch.stack(h_out) if h_out else h0
        c_n = None if c0 is None else (torch.stack(c_out) if c_out else c0)  # type: ignore[arg-type]
        return x, h_n, c_n

    def _path(self, x: torch.Tensor) -> str:
        """``"native"`` (FBGEMM loop), ``"aten"`` (the same arithmetic step by step: while tracing for export /
        compile) or ``"float"`` (eager without the native kernel: the reference's float recurrence, fp32's speed)."""
        if torch.compiler.is_compiling():
            return "aten"
        if x.device.type != "cpu":
            return "float"
        if "path" not in self._kernel_cache:
            facts = x86.Facts(device="cpu", native_ok=True, input_7bit=self.quant_max <= 127)
            symmetric = all(int(torch.count_nonzero(getattr(self, n + "_zero_point"))) == 0
                            for n in self._weight_specs)  # type: ignore[attr-defined]
            fast = symmetric and x86.choose("rnn_dynamic", facts) == "fbgemm"
            self._kernel_cache["path"] = "native" if fast else "float"
        return str(self._kernel_cache["path"])

    def _float_forward(self, input: Any, hx: Any) -> tuple[Any, Any]:
        """What the reference graph computes: the input fake-quantized per tensor at run time, then the float
        recurrence on the dequantized weights (cached)."""
        data = input.data if isinstance(input, PackedSequence) else input
        lo, hi = torch.aminmax(data.detach())
        scale, zp = dynamic.affine_qparams(float(lo), float(hi), self.quant_min, self.quant_max)
        fq = dynamic.fake_quantize(data, scale, zp, self.quant_min, self.quant_max)
        if isinstance(input, PackedSequence):
            fq = PackedSequence(fq, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        return self._REF.forward(self, fq, hx)  # type: ignore[attr-defined, no-any-return]

    def _weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 weight and one float scale per output row."""
        w = getattr(self, name + "_int")
        scale = getattr(self, name + "_scale").detach().float().reshape(-1)
        return w, scale.expand(w.shape[0]) if scale.numel() == 1 else scale

    def _bias(self, name: str) -> torch.Tensor | None:
        return getattr(self, name).detach().float() if self.bias else None  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------------------------- native
    def _native_layer(self, layer: int, x: torch.Tensor, sizes: list[int],
                      states: list[_State]) -> tuple[torch.Tensor, list[_State]]:
        m: Any = self
        hidden, gates, directions = m.hidden_size, self._GATES, len(states)
        ih = self._cached(("ih", layer), lambda: self._plan(
            [f"weight_ih{_suffix(layer, d)}" for d in range(directions)],
            [f"bias_ih{_suffix(layer, d)}" for d in range(directions)]))
        x = x.contiguous()
        lo, hi = torch.aminmax(x)
        scale, zp = dynamic.affine_qparams(float(lo), float(hi), self.quant_min, self.quant_max)
        gx = ih(x, scale, zp)
        out = torch.empty(x.shape[0], directions * hidden)
        key = tuple(sizes)  # (the last call's step sizes only: packed batches vary in length)
        last = self._kernel_cache.get("sizes")
        if last is None or last[0] != key:
            last = self._kernel_cache["sizes"] = (key, torch.tensor(sizes, dtype=torch.int32))
        sizes_t = last[1]
        finals: list[_State] = []
        threads = torch.get_num_threads() if sizes[0] * gates * hidden * hidden >= 2 ** 20 else 1
        for d, (h0, c0) in enumerate(states):
            suffix = _suffix(layer, d)
            hh = self._cached(("hh", layer, d), lambda: self._plan([f"weight_hh{suffix}"], [f"bias_hh{suffix}"]))
            h = h0.float().contiguous().clone()
            c = None if c0 is None else c0.float().contiguous().clone()
            native.rnn_recurrence(hh, gates == 3, gx, d * gates * hidden, sizes_t, bool(d), h, c, out, d * hidden,
                                  self.quant_min, self.quant_max, threads)
            finals.append((h, c))
        return out, finals

    def _plan(self, weights: list[str], biases: list[str]) -> native.DynamicLinearPlan:
        parts = [self._weight(n) for n in weights]
        bias = [self._bias(n) for n in biases]
        w = torch.cat([p[0] for p in parts]).contiguous()
        b = None if bias[0] is None else torch.cat(bias)  # type: ignore[arg-type]
        scale = torch.cat([p[1] for p in parts]).contiguous()  # (one per output row: directions may differ)
        return native.DynamicLinearPlan(w, scale, b, relu=False)

    # --------------------------------------------------------------------------------------------------- aten
    def _int_linear(self, x: torch.Tensor, weight: str, bias: str) -> torch.Tensor:
        """``s_x * s_w * ((q_x - zp) @ W_int^T) + b`` with ``x``'s qparams chosen now (the kernels' arithmetic)."""
        spec = act_spec(torch.uint8, self.quant_min, self.quant_max, type(self).__name__)
        scale, zp = dynamic_qparams(x, spec, "per_tensor")
        q = portable.quantize(x, scale, zp, portable.OutSpec(torch.uint8, self.quant_min, self.quant_max))
        w, w_scale = self._weight(weight)
        y = torch.mm(q.float() - zp, w.float().t()) * (scale * w_scale)
        b = self._bias(bias)
        return y if b is None else y + b

    def _aten_layer(self, layer: int, x: torch.Tensor, sizes: list[int],
                    states: list[_State]) -> tuple[torch.Tensor, list[_State]]:
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        outs, finals = [], []
        for d, (h, c) in enumerate(states):
            suffix = _suffix(layer, d)
            gx = self._int_linear(x, "weight_ih" + suffix, "bias_ih" + suffix)
            steps: list[torch.Tensor] = [x.new_empty(0)] * len(sizes)
            order = range(len(sizes) - 1, -1, -1) if d else range(len(sizes))
            for t in order:
                n = sizes[t]
                gh = self._int_linear(h[:n], "weight_hh" + suffix, "bias_hh" + suffix)
                h_new, c_new = self._cell(gx[starts[t]:starts[t] + n], gh, h[:n], None if c is None else c[:n])
                h = torch.cat([h_new, h[n:]])
                c = None if c is None else torch.cat([c_new, c[n:]])  # type: ignore[list-item]
                steps[t] = h_new
            outs.append(torch.cat(steps))
            finals.append((h, c))
        return torch.cat(outs, dim=1), finals

    def _cell(self, gx: torch.Tensor, gh: torch.Tensor, h: torch.Tensor,
              c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activations uint8 [{self.quant_min}, {self.quant_max}] per tensor"  # type: ignore[misc]

    def _get_name(self) -> str:
        return f"Dynamic{self._REF.__name__}"


class DynamicLSTM(_DynamicRNN, ref.LSTM):
    """LSTM with int8 weights whose input and hidden state are quantized at run time (torch.ao's dynamic LSTM)."""

    _GATES = 4
    _REF = ref.LSTM

    def _cell(self, gx: torch.Tensor, gh: torch.Tensor, h: torch.Tensor,
              c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        i, f, g, o = (gh + gx).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # type: ignore[operator]
        return torch.sigmoid(o) * torch.tanh(c_new), c_new


class DynamicGRU(_DynamicRNN, ref.GRU):
    """GRU with int8 weights whose input and hidden state are quantized at run time (torch.ao's dynamic GRU)."""

    _GATES = 3
    _REF = ref.GRU

    def _cell(self, gx: torch.Tensor, gh: torch.Tensor, h: torch.Tensor,
              c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        xr, xz, xn = gx.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        reset, update = torch.sigmoid(hr + xr), torch.sigmoid(hz + xz)
        new = torch.tanh(xn + hn * reset)
        return (h - new) * update + new, None
