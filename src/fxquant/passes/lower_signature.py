"""sign_lowered: attach the lowered graph's :class:`~fxquant.nn.quantized.signature.LoweringSignature` (the last
graph change of convert_fx is done), so that ``load_state_dict`` refuses a state dict of another lowered graph."""
from __future__ import annotations

from torch import fx, nn

from ..nn.quantized.signature import SIGNATURE_ATTR, LoweringSignature, graph_signature
from ..pipeline import Context, register_pass

__all__ = ["sign_lowered"]


@register_pass("sign_lowered")
def sign_lowered(gm: nn.Module, ctx: Context) -> nn.Module:
    assert isinstance(gm, fx.GraphModule)
    gm.add_module(SIGNATURE_ATTR, LoweringSignature(graph_signature(gm)))
    return gm
