"""qat_swap: replace float (and fused float) modules by their QAT versions (``prepare_qat_fx`` only).

Before::  self.conv: nni.ConvBnReLU2d(conv, bn, relu)   After::  self.conv: nniqat.ConvBnReLU2d (weight fake quant)

Which class replaces which comes from the BackendConfig (``qat_module`` of each pattern). A module stays float when

* its qconfig is None, or
* the backend supports its qconfig in none of the pattern's dtype configs: the same rule that leaves it float in
  ``prepare_fx`` (the annotate pass then records the reason, shown by ``fxquant.explain``). Example: ``nn.Embedding``
  under ``get_default_qat_qconfig_mapping(...)``'s global int8 qconfig (the backend only takes weight-only
  float-qparams embeddings). torch.ao swaps such modules anyway and, for embeddings, fails with an assertion;
  fxquant trains them in float, exactly as they will be deployed.

A qconfig that passes the backend's check but that the QAT class still rejects (e.g. an embedding qconfig whose weight
is not ``per_channel_affine_float_qparams``) raises :class:`~fxquant.nn.qat.QATConfigError` naming the module.
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from ..backend_config.matching import find_dtype_config
from ..nn.qat import QATConfigError
from ..pipeline import Context, register_pass
from .common import backend_config_of, set_module

__all__ = ["qat_swap", "qat_module_map"]

_ACTIVATION_ROLES = ("input", "output")  # what annotate checks for a module pattern


def _qat_configs(backend: Any) -> dict[type, Any]:
    """Float (or fused) module class -> the first pattern config naming a QAT class for it."""
    out: dict[type, Any] = {}
    for cfg in backend.configs:
        pattern = cfg.pattern
        if cfg.qat_module is not None and isinstance(pattern, type) and issubclass(pattern, nn.Module):
            out.setdefault(pattern, cfg)
    return out


def qat_module_map(backend: Any) -> dict[type, type]:
    """Float (or fused) module class -> QAT class, from the backend's pattern configs."""
    return {pattern: cfg.qat_module for pattern, cfg in _qat_configs(backend).items()}


def _swapped(path: str, mod: nn.Module, cfg: Any) -> nn.Module | None:
    """The QAT module for ``mod``, or None when it stays float (see the module docstring)."""
    qconfig = getattr(mod, "qconfig", None)
    if qconfig is None:
        return None
    supported, _ = find_dtype_config(qconfig, cfg.dtype_configs, True, roles=_ACTIVATION_ROLES)
    if supported is None:
        return None
    try:
        return cfg.qat_module.from_float(mod)
    except QATConfigError as err:
        raise QATConfigError(f"prepare_qat_fx: module {path!r} ({type(mod).__name__}): {err}") from err


@register_pass("qat_swap")
def qat_swap(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Swap every called module that has a supported qconfig and a QAT class."""
    configs = _qat_configs(backend_config_of(ctx))
    modules = ctx.modules(gm)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        path = str(node.target)
        cfg = configs.get(type(modules[path]))
        qat = None if cfg is None else _swapped(path, modules[path], cfg)
        if qat is not None:
            set_module(gm, path, qat)
    return gm
