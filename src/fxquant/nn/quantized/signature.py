"""A converted model's graph signature, so that a state dict is never loaded into a graph it does not fit.

convert_fx specialises the lowered graph on the calibrated qparams: a requantize between equal qparams is dropped,
a table that only clamps becomes a clamp whose bounds are in the code, a relu's clamp folds into the producer's
output range. Two conversions of the same model with different calibration results can therefore differ in graph,
and a state dict of one loaded into the other would give wrong results without an error. :class:`LoweringSignature`
holds a hash of the lowered graph (its ops, their order and arguments, the class of every called module); loading a
state dict whose signature differs reports the mismatch and what to do instead::

    fresh = convert_fx(prepare_fx(model, mapping, example))   # other calibration: another graph
    fresh.load_state_dict(torch.load("converted.pt"))         # RuntimeError: ... fxquant_signature ...
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import fx, nn

__all__ = ["LoweringSignature", "graph_signature", "SIGNATURE_ATTR"]

SIGNATURE_ATTR = "fxquant_signature"


def _arg_repr(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, torch.Tensor):
        return f"tensor{tuple(a.shape)}{a.dtype}"
    if isinstance(a, (tuple, list)):
        return "(" + ",".join(_arg_repr(x) for x in a) + ")"
    if isinstance(a, dict):
        return "{" + ",".join(f"{k}:{_arg_repr(v)}" for k, v in a.items()) + "}"
    if callable(a):
        return f"{getattr(a, '__module__', '')}.{getattr(a, '__qualname__', getattr(a, '__name__', repr(a)))}"
    return repr(a)


def graph_signature(gm: fx.GraphModule) -> int:
    """A 63-bit hash of ``gm``'s graph: node ops, targets (with the class of each called module) and arguments."""
    modules = dict(gm.named_modules())
    digest = hashlib.sha256()
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_module":
            mod = modules.get(str(target))
            target = f"{target}:{type(mod).__module__}.{type(mod).__qualname__}"
        digest.update(f"{node.op}|{node.name}|{_arg_repr(target) if callable(target) else target}|"
                      f"{_arg_repr(node.args)}|{_arg_repr(node.kwargs)}\n".encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


class LoweringSignature(nn.Module):
    """Holds :func:`graph_signature` of the converted model it is attached to (not called by its forward)."""

    def __init__(self, signature: int) -> None:
        super().__init__()
        self.register_buffer("signature", torch.tensor(int(signature), dtype=torch.int64))

    def forward(self) -> torch.Tensor:
        return self.signature

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        saved = state_dict.get(prefix + "signature")
        if saved is None or int(saved) == int(self.signature):  # (a state dict without one: nothing to check)
            return
        error_msgs.append(
            f"{prefix}signature: the state dict comes from a model that convert_fx lowered to another graph (its "
            f"calibration gave other qparams, and the lowered graph is specialised on them: dropped requantizes, "
            f"clamp bounds in the code). Loading it here would give wrong results. Instead load the prepared "
            f"model's state dict (the observers' statistics) before convert_fx, calibrate the fresh model the same "
            f"way, or save the converted model whole (fxquant.save / torch.save).")

    def extra_repr(self) -> str:
        return f"{int(self.signature):#x}"
