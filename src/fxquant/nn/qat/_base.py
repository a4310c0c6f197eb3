"""Shared plumbing of QAT modules: qconfig checks, weight fake quant creation, float -> QAT parameter sharing.

A QAT module is its float module plus ``weight_fake_quant`` (built from ``qconfig.weight()``) applied to the weight
in ``forward``. ``from_float`` shares the float module's parameters (the same ``Parameter`` objects, as torch.ao
does, so an optimizer created before the swap keeps working); ``to_float`` returns a float module holding detached
copies.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import (
    is_parametrized, transfer_parametrizations_and_params, type_before_parametrizations,
)

__all__ = ["QATConfigError", "check_qconfig", "make_weight_fake_quant", "check_float_module", "share_param"]


class QATConfigError(ValueError, AssertionError):
    """A QAT module got no usable qconfig, or ``from_float`` got the wrong module type.

    Subclasses ``AssertionError`` as well because torch.ao raises that for the same conditions.
    """


def check_qconfig(owner: str, qconfig: Any) -> Any:
    """Return ``qconfig`` if it can build a weight fake quant, else raise :class:`QATConfigError`."""
    if not qconfig:
        raise QATConfigError(f"{owner} needs a qconfig (e.g. fxquant.qconfig.get_default_qat_qconfig('x86')); "
                             f"got {qconfig!r}. Set module.qconfig before the QAT swap")
    weight = getattr(qconfig, "weight", None)
    if not callable(weight):
        raise QATConfigError(f"{owner}: qconfig.weight must be a fake quant constructor (a class or "
                             f"FakeQuantize.with_args(...)), got {weight!r}")
    return qconfig


def make_weight_fake_quant(qconfig: Any, device: torch.device | str | None = None) -> nn.Module:
    """Build ``qconfig.weight()`` and move it to ``device`` when given."""
    fake_quant = qconfig.weight()
    if not isinstance(fake_quant, nn.Module):
        raise QATConfigError(f"qconfig.weight() must return an nn.Module fake quant, got {type(fake_quant).__name__}")
    return fake_quant.to(device) if device is not None else fake_quant


def check_float_module(cls: type, mod: nn.Module) -> Any:
    """Check that ``cls.from_float`` can take ``mod``; return ``mod.qconfig``."""
    expected = cls._FLOAT_MODULE  # type: ignore[attr-defined]
    got = type_before_parametrizations(mod)
    if got is not expected:
        raise QATConfigError(f"{cls.__module__}.{cls.__name__}.from_float only works for "
                             f"{expected.__module__}.{expected.__name__}, got {got.__module__}.{got.__name__}")
    return check_qconfig(f"{cls.__name__}.from_float({got.__name__})", getattr(mod, "qconfig", None))


def share_param(src: nn.Module, dst: nn.Module, name: str) -> None:
    """Make ``dst.<name>`` the very parameter of ``src`` (moving parametrizations along, as torch.ao does)."""
    if is_parametrized(src, name):
        transfer_parametrizations_and_params(src, dst, name)
    else:
        setattr(dst, name, getattr(src, name))


def detached_param(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """A fresh ``Parameter`` holding ``tensor.detach()`` (``None`` stays ``None``)."""
    return None if tensor is None else nn.Parameter(tensor.detach())
