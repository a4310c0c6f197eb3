"""Fused float modules: ``nn.Sequential`` containers that mark a pattern for quantization.

A fused module computes exactly what its parts compute in sequence; it only tells prepare / convert that the parts
are quantized as one unit (no observer in between). The module classes and their part order match
``torch.ao.nn.intrinsic``, so ``fused[0]`` is the conv / linear, ``fused[1]`` the BN or activation, and so on.

Each class declares ``_parts``: the role name and the exact module type of every part. Construction checks the
types (exact type, looking through parametrizations, as torch.ao does) and raises :class:`FusionTypeError` naming
the class, the part and the expected type.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

__all__ = [
    "FusionTypeError", "FusedModule", "ConvReLU1d", "ConvReLU2d", "ConvReLU3d", "ConvBn1d", "ConvBn2d", "ConvBn3d",
    "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d", "LinearReLU", "LinearBn1d", "BNReLU2d", "BNReLU3d",
    "LinearLeakyReLU", "LinearTanh", "ConvAdd2d", "ConvAddReLU2d",
]

Part = tuple[str, type]


class FusionTypeError(TypeError, AssertionError):
    """A fused module or fuser method got parts of the wrong type or in the wrong state.

    Subclasses ``AssertionError`` too, because torch.ao raises that and migrated code may catch it.
    """


def _type_name(module: object) -> str:
    if isinstance(module, nn.Module):
        return type_before_parametrizations(module).__name__
    return type(module).__name__


def _bind_parts(cls: type, parts: tuple[Part, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Match positional / keyword arguments to the declared parts; errors name the expected signature."""
    names = [name for name, _ in parts]
    signature = ", ".join(f"{name}: {kind.__name__}" for name, kind in parts)
    unknown = set(kwargs) - set(names)
    if unknown or len(args) > len(parts):
        raise FusionTypeError(f"{cls.__name__}({signature}) got unexpected arguments "
                              f"{sorted(unknown) or len(args)}")
    bound = list(args) + [kwargs.pop(name) for name in names[len(args):] if name in kwargs]
    if len(bound) != len(parts) or kwargs:
        raise FusionTypeError(f"{cls.__name__}({signature}) needs {len(parts)} modules, got {len(args) + len(kwargs)}")
    return bound


def check_parts(cls: type, parts: tuple[Part, ...], modules: list[Any]) -> None:
    """Raise :class:`FusionTypeError` unless every module has exactly the declared type."""
    wrong = [(name, kind, module) for (name, kind), module in zip(parts, modules)
             if not isinstance(module, nn.Module) or type_before_parametrizations(module) is not kind]
    if wrong:
        detail = "; ".join(f"{name} must be torch.nn.{kind.__name__}, got {_type_name(module)}"
                           for name, kind, module in wrong)
        got = ", ".join(_type_name(m) for m in modules)
        raise FusionTypeError(f"Incorrect types for input modules of {cls.__name__}({got}): {detail}")


class FusedModule(nn.Sequential):
    """Base class of all fused float modules (torch.ao's ``_FusedModule``).

    Subclasses set ``_parts`` to ``((role, exact_type), ...)``; ``__init__`` takes the parts positionally or by
    role name.
    """

    _parts: ClassVar[tuple[Part, ...]] = ()

    def __init__(self, *modules: nn.Module, **named: nn.Module) -> None:
        bound = _bind_parts(type(self), self._parts, modules, dict(named))
        check_parts(type(self), self._parts, bound)
        super().__init__(*bound)


_FusedModule = FusedModule  # torch.ao's spelling, for isinstance checks in migrated code


class ConvReLU1d(FusedModule):
    """Conv1d followed by ReLU."""

    _parts = (("conv", nn.Conv1d), ("relu", nn.ReLU))


class ConvReLU2d(FusedModule):
    """Conv2d followed by ReLU."""

    _parts = (("conv", nn.Conv2d), ("relu", nn.ReLU))


class ConvReLU3d(FusedModule):
    """Conv3d followed by ReLU."""

    _parts = (("conv", nn.Conv3d), ("relu", nn.ReLU))


class ConvBn1d(FusedModule):
    """Conv1d followed by BatchNorm1d."""

    _parts = (("conv", nn.Conv1d), ("bn", nn.BatchNorm1d))


class ConvBn2d(FusedModule):
    """Conv2d followed by BatchNorm2d."""

    _parts = (("conv", nn.Conv2d), ("bn", nn.BatchNorm2d))


class ConvBn3d(FusedModule):
    """Conv3d followed by BatchNorm3d."""

    _parts = (("conv", nn.Conv3d), ("bn", nn.BatchNorm3d))


class ConvBnReLU1d(FusedModule):
    """Conv1d, BatchNorm1d, ReLU."""

    _parts = (("conv", nn.Conv1d), ("bn", nn.BatchNorm1d), ("relu", nn.ReLU))


class ConvBnReLU2d(FusedModule):
    """Conv2d, BatchNorm2d, ReLU."""

    _parts = (("conv", nn.Conv2d), ("bn", nn.BatchNorm2d), ("relu", nn.ReLU))


class ConvBnReLU3d(FusedModule):
    """Conv3d, BatchNorm3d, ReLU."""

    _parts = (("conv", nn.Conv3d), ("bn", nn.BatchNorm3d), ("relu", nn.ReLU))


class LinearReLU(FusedModule):
    """Linear followed by ReLU."""

    _parts = (("linear", nn.Linear), ("relu", nn.ReLU))


class LinearBn1d(FusedModule):
    """Linear followed by BatchNorm1d."""

    _parts = (("linear", nn.Linear), ("bn", nn.BatchNorm1d))


class BNReLU2d(FusedModule):
    """BatchNorm2d followed by ReLU."""

    _parts = (("batch_norm", nn.BatchNorm2d), ("relu", nn.ReLU))


class BNReLU3d(FusedModule):
    """BatchNorm3d followed by ReLU."""

    _parts = (("batch_norm", nn.BatchNorm3d), ("relu", nn.ReLU))


class LinearLeakyReLU(FusedModule):
    """Linear followed by LeakyReLU."""

    _parts = (("linear", nn.Linear), ("leaky_relu", nn.LeakyReLU))


class LinearTanh(FusedModule):
    """Linear followed by Tanh."""

    _parts = (("linear", nn.Linear), ("tanh", nn.Tanh))


def _check_add(cls: type, add: object) -> None:
    if not callable(add):
        raise FusionTypeError(f"{cls.__name__}: add must be a callable such as torch.add or operator.add, "
                              f"got {add!r}")


class ConvAdd2d(FusedModule):
    """Conv2d whose output is added to a second input: ``add(conv(x1), x2)``.

    ``self[0]`` is the conv; ``self.add`` the add callable (``torch.add`` / ``operator.add``).
    """

    _parts = (("conv", nn.Conv2d),)

    def __init__(self, conv: nn.Conv2d, add: Callable[..., torch.Tensor]) -> None:
        super().__init__(conv)
        _check_add(type(self), add)
        self.add = add

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Apply the conv to ``x1`` and add ``x2``."""
        return self.add(self[0](x1), x2)


class ConvAddReLU2d(FusedModule):
    """``relu(add(conv(x1), x2))``; ``self[0]`` is the conv, ``self.add`` / ``self.relu`` the rest."""

    _parts = (("conv", nn.Conv2d),)

    def __init__(self, conv: nn.Conv2d, add: Callable[..., torch.Tensor], relu: nn.ReLU) -> None:
        super().__init__(conv)
        _check_add(type(self), add)
        check_parts(type(self), (("relu", nn.ReLU),), [relu])
        self.add = add
        self.relu = relu

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Apply the conv to ``x1``, add ``x2``, then ReLU."""
        return self.relu(self.add(self[0](x1), x2))
