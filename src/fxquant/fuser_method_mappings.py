"""Fuser methods: turn a matched run of modules (conv, bn, relu, ...) into one module.

Every fuser method has torch.ao's signature ``fuser(is_qat, *modules)`` with the modules in forward order:

* post-training (``is_qat=False``): BatchNorm is folded into the preceding conv / linear weights using the BN running
  statistics (``torch.nn.utils.fusion``), and a trailing activation is kept in a fused container, e.g.
  ``fuse_conv_bn_relu(False, conv, bn, relu) -> ConvReLU2d(folded_conv, relu)``;
* QAT (``is_qat=True``): nothing is folded; the modules are wrapped in the fused container
  (``ConvBnReLU2d(conv, bn, relu)``) that the QAT swap turns into a fused QAT module keeping BN while training.

Checks torch.ao makes with bare asserts (or does not make) raise :class:`FusionError` / :class:`FusionTypeError`
naming the modules and the fix: modules in different train/eval modes, BN in train mode for post-training folding,
BN channel count or dimensionality not matching the conv / linear, BN without affine parameters or running stats.
Grouped ``ConvTranspose`` + BN folds correctly (torch's fold broadcasts the BN scale over the wrong weight dimension).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval
from torch.nn.utils.parametrize import type_before_parametrizations

from fxquant.nn import intrinsic as nni
from fxquant.nn.intrinsic.modules import FusionTypeError

__all__ = [
    "FusionError", "FusionTypeError", "fuse_conv_bn", "fuse_conv_bn_relu", "fuse_linear_bn", "fuse_convtranspose_bn",
    "fuse_conv_relu", "fuse_linear_relu", "fuse_bn_relu", "fuse_linear_leaky_relu", "fuse_linear_tanh",
    "fuse_linear_bn_leaky_relu", "fuse_conv_add", "fuse_conv_bn_add", "fuse_conv_add_relu", "fuse_conv_bn_add_relu",
    "sequential_wrapper", "get_fuser_method", "DEFAULT_OP_LIST_TO_FUSER_METHOD",
]

FuserMethod = Callable[..., nn.Module]


class FusionError(ValueError, AssertionError):
    """Modules that have the right types but cannot be fused in their current state (mode, shapes, BN options)."""


@dataclass(frozen=True)
class _ConvFamily:
    """The BN type that may follow a conv type, and the fused containers built from them."""

    bn: type[nn.Module]
    conv_bn: type[nn.Module]
    conv_bn_relu: type[nn.Module]
    conv_relu: type[nn.Module]


_CONV_FAMILIES: dict[type, _ConvFamily] = {
    nn.Conv1d: _ConvFamily(nn.BatchNorm1d, nni.ConvBn1d, nni.ConvBnReLU1d, nni.ConvReLU1d),
    nn.Conv2d: _ConvFamily(nn.BatchNorm2d, nni.ConvBn2d, nni.ConvBnReLU2d, nni.ConvReLU2d),
    nn.Conv3d: _ConvFamily(nn.BatchNorm3d, nni.ConvBn3d, nni.ConvBnReLU3d, nni.ConvReLU3d),
}
_CONVT_BN: dict[type, type] = {
    nn.ConvTranspose1d: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d, nn.ConvTranspose3d: nn.BatchNorm3d,
}
_BN_RELU: dict[type, type[nn.Module]] = {nn.BatchNorm2d: nni.BNReLU2d, nn.BatchNorm3d: nni.BNReLU3d}


def _kind(module: Any) -> Any:
    return type_before_parametrizations(module) if isinstance(module, nn.Module) else module


def _names(modules: tuple[Any, ...]) -> str:
    return " + ".join(getattr(_kind(m), "__name__", repr(m)) for m in modules)


def _lookup(table: dict[type, Any], module: nn.Module, what: str, modules: tuple[Any, ...]) -> Any:
    found = table.get(_kind(module))
    if found is None:
        allowed = ", ".join(t.__name__ for t in table)
        raise FusionTypeError(f"cannot fuse {_names(modules)}: {what} must be one of {allowed}, "
                              f"got {_kind(module).__name__}")
    return found


def _check_type(module: Any, expected: type, modules: tuple[Any, ...]) -> None:
    if _kind(module) is not expected:
        raise FusionTypeError(f"cannot fuse {_names(modules)}: expected {expected.__name__}, "
                              f"got {getattr(_kind(module), '__name__', repr(module))}")


def _check_same_mode(modules: tuple[Any, ...]) -> None:
    mods = [m for m in modules if isinstance(m, nn.Module)]
    if len({m.training for m in mods}) > 1:
        modes = ", ".join(f"{type(m).__name__}={'train' if m.training else 'eval'}" for m in mods)
        raise FusionError(f"cannot fuse {_names(modules)}: modules are in different modes ({modes}); call "
                          f".train() or .eval() on the whole model before fusing")


def _check_bn(bn: nn.Module, bn_type: type, channels: int, modules: tuple[Any, ...], allow_single: bool = False) -> None:
    """BN must have the expected type and one feature per output channel (or one in total, where allowed)."""
    if _kind(bn) is not bn_type:
        raise FusionTypeError(f"cannot fuse {_names(modules)}: expected {bn_type.__name__} after "
                              f"{_kind(modules[0]).__name__}, got {_kind(bn).__name__}")
    if bn.num_features != channels and not (allow_single and bn.num_features == 1):
        raise FusionError(f"cannot fuse {_names(modules)}: {_kind(bn).__name__} has num_features="
                          f"{bn.num_features} but {_kind(modules[0]).__name__} has {channels} output channels")


def _check_qat_bn(bn: nn.Module, modules: tuple[Any, ...]) -> None:
    if not bn.affine or not bn.track_running_stats:
        raise FusionError(f"cannot fuse {_names(modules)} for QAT: the BatchNorm needs affine=True and "
                          f"track_running_stats=True (got affine={bn.affine}, "
                          f"track_running_stats={bn.track_running_stats})")


def _check_foldable(bn: nn.Module, modules: tuple[Any, ...]) -> None:
    if bn.training:
        raise FusionError(f"cannot fold {_names(modules)} for post-training quantization while in train mode: "
                          f"folding uses the BN running statistics. Call model.eval() before prepare_fx / fuse_fx, "
                          f"or use prepare_qat_fx to keep BatchNorm during training")
    if bn.running_mean is None or bn.running_var is None:
        raise FusionError(f"cannot fold {_names(modules)}: the BatchNorm has no running statistics "
                          f"(track_running_stats=False); keep it unfused")


def fold_convtranspose_bn(convt: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a copy of ``convt`` with eval-mode ``bn`` folded in; correct for ``groups > 1`` too."""
    if convt.groups == 1:
        return fuse_conv_bn_eval(convt, bn, transpose=True)
    weight = convt.weight  # (in, out / groups, *k): output channel = group * (out / groups) + j
    groups, in_per_group, out_per_group = convt.groups, weight.shape[0] // convt.groups, weight.shape[1]
    spatial = weight.shape[2:]
    as_ungrouped = weight.reshape(groups, in_per_group, out_per_group, *spatial).transpose(0, 1)
    as_ungrouped = as_ungrouped.reshape(in_per_group, groups * out_per_group, *spatial)
    new_w, new_b = fuse_conv_bn_weights(as_ungrouped, convt.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias, transpose=True)
    regrouped = new_w.detach().reshape(in_per_group, groups, out_per_group, *spatial).transpose(0, 1)
    fused_convt = copy.deepcopy(convt)
    fused_convt.weight = nn.Parameter(regrouped.reshape(weight.shape).contiguous(), weight.requires_grad)
    fused_convt.bias = new_b
    return fused_convt


def fuse_conv_bn(is_qat: bool, conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Conv1d/2d/3d + BatchNorm: QAT -> ``ConvBnNd(conv, bn)``; post-training -> conv with BN folded in."""
    modules = (conv, bn)
    family = _lookup(_CONV_FAMILIES, conv, "the conv", modules)
    _check_same_mode(modules)
    _check_bn(bn, family.bn, conv.out_channels, modules)
    if is_qat:
        _check_qat_bn(bn, modules)
        return family.conv_bn(conv, bn)
    _check_foldable(bn, modules)
    return fuse_conv_bn_eval(conv, bn)


def fuse_conv_bn_relu(is_qat: bool, conv: nn.Module, bn: nn.Module, relu: nn.Module) -> nn.Module:
    """Conv + BatchNorm + ReLU: QAT -> ``ConvBnReLUNd``; post-training -> ``ConvReLUNd(folded_conv, relu)``."""
    modules = (conv, bn, relu)
    family = _lookup(_CONV_FAMILIES, conv, "the conv", modules)
    _check_same_mode(modules)
    _check_bn(bn, family.bn, conv.out_channels, modules)
    if is_qat:
        _check_qat_bn(bn, modules)
        return family.conv_bn_relu(conv, bn, relu)
    _check_foldable(bn, modules)
    return family.conv_relu(fuse_conv_bn_eval(conv, bn), relu)


def fuse_linear_bn(is_qat: bool, linear: nn.Module, bn: nn.Module) -> nn.Module:
    """Linear + BatchNorm1d: QAT -> ``LinearBn1d``; post-training -> linear with BN folded in.

    Post-training folding also accepts a one-feature BN (broadcast over all outputs), as torch does.
    """
    modules = (linear, bn)
    _check_type(linear, nn.Linear, modules)
    _check_same_mode(modules)
    _check_bn(bn, nn.BatchNorm1d, linear.out_features, modules, allow_single=not is_qat)
    if is_qat:
        _check_qat_bn(bn, modules)
        return nni.LinearBn1d(linear, bn)
    _check_foldable(bn, modules)
    return fuse_linear_bn_eval(linear, bn)


def fuse_convtranspose_bn(is_qat: bool, convt: nn.Module, bn: nn.Module) -> nn.Module:
    """ConvTranspose1d/2d/3d + BatchNorm: post-training folds BN into the weights; QAT is not supported."""
    modules = (convt, bn)
    bn_type = _lookup(_CONVT_BN, convt, "the transposed conv", modules)
    _check_same_mode(modules)
    _check_bn(bn, bn_type, convt.out_channels, modules)
    if is_qat:
        raise NotImplementedError(f"fusing {_names(modules)} is not supported for QAT (as in torch.ao); leave the "
                                  f"BatchNorm unfused for QAT or fuse after training")
    _check_foldable(bn, modules)
    return fold_convtranspose_bn(convt, bn)


def fuse_linear_bn_leaky_relu(is_qat: bool, linear: nn.Module, bn: nn.Module, leaky_relu: nn.Module) -> nn.Module:
    """Linear + BatchNorm1d + LeakyReLU (onednn): post-training -> ``LinearLeakyReLU(folded_linear, leaky_relu)``."""
    modules = (linear, bn, leaky_relu)
    _check_type(leaky_relu, nn.LeakyReLU, modules)
    _check_same_mode(modules)
    if is_qat:
        raise NotImplementedError(f"fusing {_names(modules)} is not supported for QAT (as in torch.ao)")
    return nni.LinearLeakyReLU(fuse_linear_bn(False, linear, bn), leaky_relu)


def sequential_wrapper(fused_cls: Callable[..., nn.Module]) -> FuserMethod:
    """Fuser method that ignores ``is_qat`` and wraps the modules in ``fused_cls`` (torch's ``_sequential_wrapper2``).

    The modules must be in the same train / eval mode; ``fused_cls`` checks their types.
    """

    def fuser_method(is_qat: bool, *modules: nn.Module) -> nn.Module:
        _check_same_mode(modules)
        return fused_cls(*modules)

    fuser_method.__name__ = fuser_method.__qualname__ = f"fuse_to_{getattr(fused_cls, '__name__', 'fused')}"
    fuser_method.__doc__ = f"Wrap the modules in {getattr(fused_cls, '__name__', fused_cls)}."
    return fuser_method


_sequential_wrapper2 = sequential_wrapper  # torch.ao's private spelling


def fuse_conv_relu(is_qat: bool, conv: nn.Module, relu: nn.Module) -> nn.Module:
    """Conv1d/2d/3d + ReLU -> ``ConvReLUNd`` (same for QAT and post-training)."""
    family = _lookup(_CONV_FAMILIES, conv, "the conv", (conv, relu))
    return sequential_wrapper(family.conv_relu)(is_qat, conv, relu)


def fuse_bn_relu(is_qat: bool, bn: nn.Module, relu: nn.Module) -> nn.Module:
    """BatchNorm2d/3d + ReLU -> ``BNReLU2d`` / ``BNReLU3d``."""
    fused_cls = _lookup(_BN_RELU, bn, "the batch norm", (bn, relu))
    return sequential_wrapper(fused_cls)(is_qat, bn, relu)


fuse_linear_relu: FuserMethod = sequential_wrapper(nni.LinearReLU)
fuse_linear_relu.__name__ = fuse_linear_relu.__qualname__ = "fuse_linear_relu"
fuse_linear_leaky_relu: FuserMethod = sequential_wrapper(nni.LinearLeakyReLU)
fuse_linear_leaky_relu.__name__ = fuse_linear_leaky_relu.__qualname__ = "fuse_linear_leaky_relu"
fuse_linear_tanh: FuserMethod = sequential_wrapper(nni.LinearTanh)
fuse_linear_tanh.__name__ = fuse_linear_tanh.__qualname__ = "fuse_linear_tanh"


def fuse_conv_add(is_qat: bool, conv: nn.Module, add: Callable[..., torch.Tensor]) -> nn.Module:
    """Conv2d + add (``torch.add`` / ``operator.add``) -> ``ConvAdd2d(conv, add)``."""
    return nni.ConvAdd2d(conv, add)


def fuse_conv_add_relu(is_qat: bool, conv: nn.Module, add: Callable[..., torch.Tensor], relu: nn.Module) -> nn.Module:
    """Conv2d + add + ReLU -> ``ConvAddReLU2d(conv, add, relu)``."""
    return nni.ConvAddReLU2d(conv, add, relu)


def fuse_conv_bn_add(is_qat: bool, conv: nn.Module, bn: nn.Module, add: Callable[..., torch.Tensor]) -> nn.Module:
    """Conv2d + BatchNorm2d + add: post-training -> ``ConvAdd2d(folded_conv, add)``; not supported for QAT."""
    if is_qat:
        raise NotImplementedError(f"fusing {_names((conv, bn))} + add is not supported for QAT (as in torch.ao)")
    return nni.ConvAdd2d(fuse_conv_bn(False, conv, bn), add)


def fuse_conv_bn_add_relu(is_qat: bool, conv: nn.Module, bn: nn.Module, add: Callable[..., torch.Tensor],
                          relu: nn.Module) -> nn.Module:
    """Conv2d + BatchNorm2d + add + ReLU: post-training -> ``ConvAddReLU2d(folded_conv, add, relu)``."""
    if is_qat:
        raise NotImplementedError(f"fusing {_names((conv, bn, relu))} + add is not supported for QAT "
                                  f"(as in torch.ao)")
    return nni.ConvAddReLU2d(fuse_conv_bn(False, conv, bn), add, relu)


#: (module types in forward order) -> fuser method; torch.ao's default table plus the onednn-only patterns.
DEFAULT_OP_LIST_TO_FUSER_METHOD: dict[tuple[Any, ...], FuserMethod] = {
    **{(conv, fam.bn): fuse_conv_bn for conv, fam in _CONV_FAMILIES.items()},
    **{(conv, fam.bn, nn.ReLU): fuse_conv_bn_relu for conv, fam in _CONV_FAMILIES.items()},
    **{(conv, nn.ReLU): fuse_conv_relu for conv in _CONV_FAMILIES},
    (nn.Linear, nn.BatchNorm1d): fuse_linear_bn,
    (nn.Linear, nn.ReLU): fuse_linear_relu,
    **{(bn, nn.ReLU): fuse_bn_relu for bn in _BN_RELU},
    **{(convt, bn): fuse_convtranspose_bn for convt, bn in _CONVT_BN.items()},
    (nn.Linear, nn.LeakyReLU): fuse_linear_leaky_relu,
    (nn.Linear, nn.Tanh): fuse_linear_tanh,
    (nn.Linear, nn.BatchNorm1d, nn.LeakyReLU): fuse_linear_bn_leaky_relu,
}


def get_fuser_method(op_list: tuple[Any, ...],
                     additional_fuser_method_mapping: dict[tuple[Any, ...], FuserMethod] | None = None) -> FuserMethod:
    """Return the fuser method for a tuple of module types in forward order, e.g. ``(nn.Conv2d, nn.BatchNorm2d)``.

    ``additional_fuser_method_mapping`` entries override the defaults. Raises ``FusionTypeError`` (an
    ``AssertionError``, as torch.ao raises) listing the known patterns when there is none.
    """
    mapping = {**DEFAULT_OP_LIST_TO_FUSER_METHOD, **(additional_fuser_method_mapping or {})}
    key = tuple(op_list)
    if key not in mapping:
        known = "; ".join(_names(k) for k in mapping)
        raise FusionTypeError(f"no fuser method for {_names(key)}; known patterns: {known}. Pass "
                              f"additional_fuser_method_mapping={{{key!r}: fuser}} to add one")
    return mapping[key]
