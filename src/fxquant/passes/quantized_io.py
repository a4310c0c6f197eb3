"""quantized_io: check and wire the model inputs / outputs declared quantized (PrepareCustomConfig
``input_quantized_indexes`` / ``output_quantized_indexes``) in the prepared model.

Calibration runs on float inputs, as in torch.ao. Unlike torch.ao, a quantized input keeps an observer: the one the
op reading it got from ``observe``. Its range defines the qparams the converted model expects the integer input in
(torch.ao's input tensor carries its own scale instead), so the prepared graph has one observer more per quantized
input than torch.ao's. Every reader of the placeholder reads that observer::

    Before::  x -> app_0 -> conv;  x -> size                 After::  x -> app_0 -> conv;  app_0 -> size

A quantized output must be the output of an observer (a static integer one) at every tensor leaf of
``out[index]`` (``index`` 0 for a model returning one tensor or a dict, as torch.ao). Anything else is a ValueError
naming the node and the fix. ``quantized_io_convert`` turns these observers into the integer boundary at convert.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import fx, nn

from .._dtypes import is_float_qdtype, normalize_dtype
from ..pipeline import Context, register_pass
from .common import is_observer

__all__ = ["quantized_io", "declared_indexes", "input_placeholders", "output_leaves", "boundary_observer",
           "check_static_integer"]

_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)


def declared_indexes(cfg: Any) -> tuple[list[int], list[int]]:
    """(input_quantized_indexes, output_quantized_indexes) of a PrepareCustomConfig (empty lists for None)."""
    return (list(getattr(cfg, "input_quantized_indexes", None) or []),
            list(getattr(cfg, "output_quantized_indexes", None) or []))


def input_placeholders(gm: fx.GraphModule, indexes: list[int]) -> dict[int, fx.Node]:
    """Placeholder node of each declared input index (positional order, as torch.ao counts)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = {}
    for i in indexes:
        if i >= len(placeholders):
            raise ValueError(f"input_quantized_indexes has {i}, but the model takes {len(placeholders)} input(s) "
                             f"({', '.join(p.name for p in placeholders)}); use indexes of forward()'s arguments")
        out[i] = placeholders[i]
    return out


def _leaves(value: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    else:
        yield path, value


def output_leaves(gm: fx.GraphModule, indexes: list[int]) -> list[tuple[Any, tuple, fx.Node]]:
    """(key, path, node) of every graph node returned inside ``out[index]`` for the declared output indexes.

    ``path`` indexes the returned value (``()`` when the model returns one tensor); ``key`` is ``path[0]`` for a
    path of one step, 0 for the empty path, else the path itself (see ``fxquant.boundary_qparams``)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = output.args[0]
    found = []
    for idx in indexes:
        if isinstance(value, (list, tuple)):
            if idx >= len(value):
                raise ValueError(f"output_quantized_indexes has {idx}, but the model returns {len(value)} values")
            leaves = _leaves(value[idx], (idx,))
        elif idx == 0:
            leaves = _leaves(value, ())
        else:
            raise ValueError(f"output_quantized_indexes has {idx}, but the model returns one value "
                             f"({type(value).__name__}); use index 0 for it")
        for path, leaf in leaves:
            if isinstance(leaf, fx.Node):
                found.append((0 if not path else path[0] if len(path) == 1 else path, path, leaf))
    return found


def boundary_observer(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[nn.Module]:
    """The observer / fake quant a call_module node runs, else None."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return mod if is_observer(mod) else None
    return None


def check_static_integer(obs: nn.Module, where: str) -> torch.dtype:
    """The plain integer dtype of a boundary observer; ValueError for fp16 / dynamic / per-channel ones."""
    dtype = normalize_dtype(getattr(obs, "dtype", torch.float32))
    why = ("its qparams are chosen at run time (dynamic quantization)" if getattr(obs, "is_dynamic", False)
           else f"it is quantized to {dtype}, a float type with no scale to share" if is_float_qdtype(dtype)
           or dtype in (torch.float32, torch.float, None)
           else "its qparams are per channel" if getattr(obs, "qscheme", None) in _PER_CHANNEL else "")
    if why:
        raise ValueError(f"{where} is declared quantized, but {why} ({type(obs).__name__}): a quantized model input / "
                         f"output needs a static per-tensor integer qconfig (e.g. default_qconfig) for the ops there; "
                         f"change their qconfig or remove the index from the PrepareCustomConfig")
    return dtype


def _wire_input(gm: fx.GraphModule, i: int, ph: fx.Node, modules: dict[str, nn.Module]) -> None:
    observers = [u for u in ph.users if boundary_observer(u, modules) is not None]
    if not observers:
        readers = ", ".join(u.name for u in ph.users) or "nothing"
        raise ValueError(f"input_quantized_indexes has {i}, but input {i} ({ph.name!r}) has no quantized consumer "
                         f"(it is read by {readers}), so nothing defines its scale and zero point. Remove {i} from "
                         f"input_quantized_indexes, or give the op reading {ph.name!r} a quantizing qconfig "
                         f"(fxquant.explain(prepared) says why it stays float)")
    boundary = observers[0]
    check_static_integer(boundary_observer(boundary, modules), f"input {i} ({ph.name!r})")
    for user in list(ph.users):
        if user is not boundary:
            user.replace_input_with(ph, boundary)


def _check_output(key: Any, leaf: fx.Node, modules: dict[str, nn.Module]) -> None:
    obs = boundary_observer(leaf, modules)
    if obs is None:
        info = leaf.meta.get("fxquant_value")
        if info is not None and not info.is_tensor:
            return  # a shape, a count: nothing to quantize
        raise ValueError(f"output {key!r} is declared quantized (output_quantized_indexes), but it is the value of "
                         f"{leaf.name!r} ({leaf.op} {getattr(leaf.target, '__name__', leaf.target)}), which is not "
                         f"quantized. Give {leaf.name!r} a quantizing qconfig (fxquant.explain(prepared) says why "
                         f"it stays float) or remove the index from output_quantized_indexes")
    check_static_integer(obs, f"output {key!r} ({leaf.args[0].name!r})")


@register_pass("quantized_io")
def quantized_io(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Check the declared quantized inputs / outputs and route each quantized input through its observer."""
    inputs, outputs = declared_indexes(ctx.prepare_custom_config)
    if not inputs and not outputs:
        return gm
    modules = dict(gm.named_modules(remove_duplicate=False))
    for i, ph in input_placeholders(gm, inputs).items():
        _wire_input(gm, i, ph, modules)
    for key, _, leaf in output_leaves(gm, outputs):
        _check_output(key, leaf, modules)
    return gm
