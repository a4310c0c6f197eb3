"""Convert-time QConfigMapping: which nodes a ``convert_fx(..., qconfig_mapping=M)`` call leaves in float."""
from __future__ import annotations

from typing import Any, Optional

from ..qconfig_resolver import build_qconfig_resolver, check_convert_qconfig_mapping

__all__ = ["float_nodes_for"]


def float_nodes_for(state: Any, mapping: Optional[Any]) -> set[str]:
    """Names of nodes whose qconfig ``mapping`` sets to None (CONTRACT §1); validates ``mapping`` first."""
    if mapping is None:
        return set()
    if isinstance(mapping, dict):
        from ..qconfig_mapping import QConfigMapping

        mapping = QConfigMapping.from_dict(mapping)
    check_convert_qconfig_mapping(state.qconfig_mapping, mapping)
    resolver = build_qconfig_resolver(mapping)
    out: set[str] = set()
    for name, rec in state.nodes.items():
        if rec.op == "call_module":
            qconfig = resolver.for_module(rec.path, rec.target)
        elif rec.op == "call_function":
            qconfig = resolver.for_function(rec.path, rec.scope_type, rec.target)
        else:
            qconfig = resolver.for_method(rec.path, rec.scope_type, str(rec.target))
        if qconfig is None and rec.qconfig is not None:
            out.add(name)
    return out
