"""qat_swap: replace float (and fused float) modules by their QAT versions (``prepare_qat_fx`` only).

Before::  self.conv: nni.ConvBnReLU2d(conv, bn, relu)   After::  self.conv: nniqat.ConvBnReLU2d (weight fake quant)

Which class replaces which comes from the BackendConfig (``qat_module`` of each pattern); modules whose qconfig
is None stay float.
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from ..pipeline import Context, register_pass
from .common import backend_config_of, set_module

__all__ = ["qat_swap", "qat_module_map"]


def qat_module_map(backend: Any) -> dict[type, type]:
    """Float (or fused) module class -> QAT class, from the backend's pattern configs."""
    out: dict[type, type] = {}
    for cfg in backend.configs:
        pattern = cfg.pattern
        if cfg.qat_module is not None and isinstance(pattern, type) and issubclass(pattern, nn.Module):
            out.setdefault(pattern, cfg.qat_module)
    return out


@register_pass("qat_swap")
def qat_swap(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Swap every called module that has a qconfig and a QAT class."""
    mapping = qat_module_map(backend_config_of(ctx))
    modules = ctx.modules(gm)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[str(node.target)]
        qat_cls = mapping.get(type(mod))
        if qat_cls is None or getattr(mod, "qconfig", None) is None:
            continue
        set_module(gm, str(node.target), qat_cls.from_float(mod))
    return gm
