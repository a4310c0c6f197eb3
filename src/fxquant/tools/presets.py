"""Named QConfigMapping presets (the command line's ``--qconfig``) and module skipping (``--skip``).

==============  ==============================================================================================
preset          what it quantizes
==============  ==============================================================================================
default         ``get_default_qconfig_mapping(backend)`` (x86: histogram activations 0..127, per-channel weights);
                a fused Linear + Tanh gets the global qconfig (see ``_fused_linear_tanh``)
per-tensor      the default mapping with per-tensor symmetric int8 weights for every op
histogram       HistogramObserver activations and per-channel weights everywhere (x86's default, explicit)
dynamic         nn.Linear / F.linear / LSTM / GRU / RNN cells with int8 weights, activations quantized per batch at
                run time; ``torch.addmm`` of a constant weight too (Hugging Face's Conv1D, rewritten as a linear)
weight-only     nn.Embedding / nn.EmbeddingBag rows as uint8 with float scale / offset; everything else float
==============  ==============================================================================================
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PRESETS", "BACKENDS", "qconfig_mapping_for", "backend_config_for", "skip_modules"]

PRESETS = ("default", "per-tensor", "histogram", "dynamic", "weight-only")
BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")

_DYNAMIC_TYPES = (nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell)


def _reduce_range(backend: str) -> bool:
    return backend in ("x86", "fbgemm")


def _fused_linear_tanh(mapping: Any) -> Any:
    """The default mappings give nn.Tanh fixed qparams and nn.Linear none, and the onednn backend fuses Linear +
    Tanh (BERT's pooler): prepare_fx then refuses the fused module, as torch.ao does. A preset settles it the way
    the error suggests -- the fused module gets the global qconfig (its output observed, not fixed)."""
    from ..nn import intrinsic as nni

    if nn.Tanh in mapping.object_type_qconfigs and nn.Linear not in mapping.object_type_qconfigs:
        mapping.set_object_type(nni.LinearTanh, mapping.global_qconfig)
    return mapping


def qconfig_mapping_for(preset: str, backend: str = "x86") -> Any:
    """The QConfigMapping of ``preset`` (one of :data:`PRESETS`) for ``backend`` (one of :data:`BACKENDS`)."""
    from .. import observer as obs
    from ..qconfig import QConfig, default_dynamic_qconfig, float_qparams_weight_only_qconfig
    from ..qconfig_mapping import QConfigMapping, get_default_qconfig_mapping

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if preset == "default":
        return _fused_linear_tanh(get_default_qconfig_mapping(backend))
    if preset in ("per-tensor", "histogram"):
        act = obs.HistogramObserver.with_args(reduce_range=_reduce_range(backend))
        weight = obs.default_weight_observer if preset == "per-tensor" else obs.default_per_channel_weight_observer
        return _fused_linear_tanh(get_default_qconfig_mapping(backend).set_global(QConfig(activation=act,
                                                                                          weight=weight)))
    if preset == "dynamic":
        from ..nn import intrinsic as nni

        mapping = QConfigMapping()
        # the fused Linear + activation modules too: fusion runs first (a T5 feed-forward is Linear -> ReLU), and a
        # fused module needs its parts' qconfigs to agree (the ReLU has none here) or one of its own
        for cls in _DYNAMIC_TYPES + (nni.LinearReLU, nni.LinearLeakyReLU, nni.LinearTanh):
            mapping.set_object_type(cls, default_dynamic_qconfig)
        for fn in (F.linear, torch.addmm):  # functional linears; addmm(b, x, W) becomes one (passes/addmm_as_linear)
            mapping.set_object_type(fn, default_dynamic_qconfig)
        return mapping
    if preset == "weight-only":
        return (QConfigMapping().set_object_type(nn.Embedding, float_qparams_weight_only_qconfig)
                .set_object_type(nn.EmbeddingBag, float_qparams_weight_only_qconfig))
    raise ValueError(f"unknown qconfig preset {preset!r}; use one of {', '.join(PRESETS)}")


def backend_config_for(backend: str) -> Any:
    """The built-in BackendConfig named ``backend``."""
    from .. import backend_config as bc

    factories = {"x86": bc.get_x86_backend_config, "fbgemm": bc.get_fbgemm_backend_config,
                 "qnnpack": bc.get_qnnpack_backend_config, "onednn": bc.get_onednn_backend_config}
    if backend not in factories:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return factories[backend]()


def skip_modules(mapping: Any, model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Leave modules in float: an exact module path becomes ``set_module_name(path, None)``, anything else a
    ``set_module_name_regex(pattern, None)``. Returns the module paths skipped; ValueError when a pattern is not a
    valid regex or matches no module."""
    names = [n for n, _ in model.named_modules() if n]
    skipped: list[str] = []
    for pattern in patterns:
        if pattern in names:
            mapping.set_module_name(pattern, None)
            skipped.append(pattern)
            continue
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"--skip {pattern!r} is neither a module name nor a valid regex ({exc})") from None
        hits = [n for n in names if regex.match(n)]
        if not hits:
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"--skip {pattern!r} matches no module; module names look like: {sample}")
        mapping.set_module_name_regex(pattern, None)
        skipped.extend(hits)
    return skipped
