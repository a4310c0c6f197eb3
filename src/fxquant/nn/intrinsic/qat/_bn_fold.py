"""BatchNorm kept during QAT, with the weight fake-quantized as it will be after folding.

At convert time BN is folded into the weights: ``w_folded = w * gamma / sqrt(running_var + eps)``; so the weight
that must be fake-quantized during training is ``w_folded``, not ``w``. The forward therefore

1. scales the weight per output channel by ``s = gamma / running_std`` and fake-quantizes it,
2. runs the conv / linear with that weight and a zero bias,
3. divides the output by ``s`` again (undoing the scale, so BN sees the un-normalized output), adds the bias,
4. applies the BN module: batch statistics (and running-stat updates) while training, running statistics once
   frozen (``freeze_bn_stats``).

Where ``gamma == 0`` for a channel (e.g. ResNets initialised with zero-gamma residual BNs) torch.ao divides 0 by 0
and produces NaN; here that channel is scaled by 1 instead, which gives the exact BN output (``beta``) and folds to
a zero weight at convert. Everywhere else the arithmetic is torch.ao's, op for op.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxquant.nn.qat._base import QATConfigError

__all__ = ["BnFoldingMixin", "check_bn_for_qat", "freeze_bn_stats", "update_bn_stats"]


def check_bn_for_qat(owner: str, channels: int, bn: nn.Module) -> None:
    """The BN of a fused QAT module needs affine parameters, running stats and one feature per output channel."""
    if not (bn.affine and bn.track_running_stats):
        raise QATConfigError(f"{owner}: the BatchNorm needs affine=True and track_running_stats=True to be kept "
                             f"during QAT (got affine={bn.affine}, track_running_stats={bn.track_running_stats})")
    if bn.num_features != channels:
        raise QATConfigError(f"{owner}: BatchNorm num_features={bn.num_features} does not match the "
                             f"{channels} output channels of the conv / linear")


def _channel_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


class BnFoldingMixin:
    """Training-time BN handling shared by the fused conv-bn and linear-bn QAT modules.

    Hosts set ``weight``, ``bias``, ``weight_fake_quant``, implement ``_weight_op(input, weight, zero_bias)`` and
    ``_weight_ndim()``, and call ``_init_bn`` once in ``__init__``.
    """

    bn: nn.Module
    freeze_bn: bool
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_fake_quant: nn.Module
    training: bool

    def _init_bn(self, bn_cls: type[nn.Module], num_features: int, eps: float, momentum: float | None,
                 freeze_bn: bool) -> None:
        self.bn = bn_cls(num_features, eps, momentum, True, True)
        self.reset_bn_parameters()
        if freeze_bn:
            self.freeze_bn_stats()
        else:
            self.update_bn_stats()

    def reset_running_stats(self) -> None:
        """Reset the BN running mean / variance / batch count."""
        self.bn.reset_running_stats()

    def reset_bn_parameters(self) -> None:
        """Reset the BN running stats, ``gamma ~ U(0, 1)``, ``beta = 0`` (torch.ao's initialisation)."""
        self.bn.reset_running_stats()
        nn.init.uniform_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def update_bn_stats(self) -> Any:
        """Let BN use batch statistics and update its running stats again while the module trains."""
        self.freeze_bn = False
        self.bn.training = self.training
        return self

    def freeze_bn_stats(self) -> Any:
        """Stop updating the BN running stats; BN normalizes with them from now on, in train mode too."""
        self.freeze_bn = True
        self.bn.training = False
        return self

    def train(self, mode: bool = True) -> Any:
        """Set train / eval mode; a frozen BN stays in eval mode whatever ``mode`` is."""
        self.training = mode
        for child in self.children():  # type: ignore[attr-defined]
            if child is not self.bn or not self.freeze_bn:
                child.train(mode)
        return self

    def _weight_op(self, input: torch.Tensor, weight: torch.Tensor, zero_bias: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weight_ndim(self) -> int:
        """Number of weight dimensions, from module attributes (so torch.fx can trace the forward)."""
        raise NotImplementedError

    def _bn_folded_forward(self, input: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the BN-scaled weight, run the op, undo the scale, add the bias and apply BN."""
        bn = self.bn
        running_std = torch.sqrt(bn.running_var + bn.eps)
        scale = bn.weight / running_std
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # gamma == 0: avoid 0 / 0
        ndim = self._weight_ndim()
        fq_weight = self.weight_fake_quant(self.weight * scale.reshape(_channel_shape(ndim, 0)))
        zero_bias = torch.zeros(scale.shape[0], device=fq_weight.device, dtype=input.dtype)
        out = self._weight_op(input, fq_weight, zero_bias) / scale.reshape(_channel_shape(ndim, 1))
        if self.bias is not None:
            out = out + self.bias.reshape(_channel_shape(ndim, 1))
        return bn(out)

    def _share_bn(self, bn: nn.Module) -> None:
        """Use ``bn``'s parameters and running-stat buffers (the same tensors) in this module's BN."""
        self.bn.weight = bn.weight
        self.bn.bias = bn.bias
        self.bn.running_mean = bn.running_mean
        self.bn.running_var = bn.running_var
        self.bn.num_batches_tracked = bn.num_batches_tracked

    def _folded_weight_and_bias(self, fuse: Any, weight: torch.Tensor,
                                bias: torch.Tensor | None) -> tuple[nn.Parameter, nn.Parameter]:
        """Fold the BN running stats into ``weight`` / ``bias`` with ``fuse`` (a torch.nn.utils.fusion function)."""
        bn = self.bn
        if bn.running_mean is None or bn.running_var is None:
            raise QATConfigError(f"{type(self).__name__}.to_float: the BatchNorm has no running statistics to fold")
        return fuse(weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


def freeze_bn_stats(mod: nn.Module) -> None:
    """``model.apply(freeze_bn_stats)``: freeze the BN statistics of every fused conv-bn / linear-bn QAT module.

    Unlike torch.ao's function, ``LinearBn1d`` is frozen too.
    """
    if isinstance(mod, BnFoldingMixin):
        mod.freeze_bn_stats()


def update_bn_stats(mod: nn.Module) -> None:
    """``model.apply(update_bn_stats)``: let every fused conv-bn / linear-bn QAT module update BN statistics again."""
    if isinstance(mod, BnFoldingMixin):
        mod.update_bn_stats()
