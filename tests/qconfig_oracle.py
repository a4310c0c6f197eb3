"""Helpers to compare fxquant and torch.ao observer constructors by class name and arguments (dtypes normalised)."""
import functools

import torch

from fxquant._dtypes import normalize_dtype

OBSERVER_ATTRS = ("dtype", "qscheme", "quant_min", "quant_max", "reduce_range", "eps", "ch_axis",
                  "averaging_constant", "is_dynamic", "bins", "scale", "zero_point")


def _norm(value):
    return normalize_dtype(value) if isinstance(value, torch.dtype) else value


def ctor_spec(ctor):
    """(class name, sorted normalised keywords) of a constructor; nested ``observer=`` handled recursively."""
    if ctor is None:
        return None
    partial = getattr(ctor, "p", None)
    if isinstance(partial, functools.partial):
        kwargs = tuple(sorted((k, ctor_spec(v) if k == "observer" else _norm(v)) for k, v in partial.keywords.items()))
        return (partial.func.__name__, partial.args, kwargs)
    return (ctor.__name__, (), ())


def instance_spec(ctor):
    """Attributes of a freshly built observer (and of the observer inside a fake quant)."""
    if ctor is None:
        return None
    inst = ctor()
    out = {"class": type(inst).__name__}
    for target, prefix in ((inst, ""), (getattr(inst, "activation_post_process", None), "obs.")):
        for name in OBSERVER_ATTRS if target is not None else ():
            if hasattr(target, name):
                value = getattr(target, name)
                if isinstance(value, torch.Tensor):
                    value = value.tolist()
                out[prefix + name] = _norm(value)
    return out


def qconfig_spec(qconfig, instances=True):
    if qconfig is None:
        return None
    fn = instance_spec if instances else ctor_spec
    return (fn(qconfig.activation), fn(qconfig.weight))
