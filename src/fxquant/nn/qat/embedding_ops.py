"""QAT ``Embedding`` / ``EmbeddingBag``: the table goes through ``weight_fake_quant`` in forward.

As in torch.ao, the weight fake quant must use ``torch.per_channel_affine_float_qparams`` (one float scale and zero
point per row), since that is the only scheme the quantized embedding kernels take.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._base import QATConfigError, check_float_module, check_qconfig, detached_param, make_weight_fake_quant

__all__ = ["Embedding", "EmbeddingBag"]


def _embedding_fake_quant(owner: str, qconfig: Any, device: torch.device | str | None) -> nn.Module:
    check_qconfig(owner, qconfig)
    fake_quant = make_weight_fake_quant(qconfig, device)
    qscheme = getattr(fake_quant, "qscheme", None)
    if qscheme != torch.per_channel_affine_float_qparams:
        raise QATConfigError(f"{owner} weights need qscheme torch.per_channel_affine_float_qparams, got {qscheme}; "
                             f"use a qconfig like fxquant.qconfig.float_qparams_weight_only_qconfig with a fake "
                             f"quant weight")
    return fake_quant


class Embedding(nn.Embedding):
    """``nn.Embedding`` with a per-row float-qparams weight fake quant (torch.ao.nn.qat.Embedding)."""

    _FLOAT_MODULE: ClassVar[type[nn.Module]] = nn.Embedding

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: torch.Tensor | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, qconfig: Any = None) -> None:
        fake_quant = _embedding_fake_quant(type(self).__name__, qconfig, device)
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, device=device, dtype=dtype)
        self.qconfig = qconfig
        self.weight_fake_quant = fake_quant

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Look up ``input`` in ``weight_fake_quant(weight)``."""
        return F.embedding(input, self.weight_fake_quant(self.weight), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> Embedding:
        """Build from a float ``nn.Embedding`` carrying ``mod.qconfig``; the table is shared (same storage)."""
        qconfig = check_float_module(cls, mod)
        return cls(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, mod.max_norm, mod.norm_type,
                   mod.scale_grad_by_freq, mod.sparse, mod.weight, qconfig=qconfig)

    def to_float(self) -> nn.Embedding:
        """A float ``nn.Embedding`` holding a detached copy of the table."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse, None)
        emb.weight = detached_param(self.weight)
        return emb.train(self.training)


class EmbeddingBag(nn.EmbeddingBag):
    """``nn.EmbeddingBag`` with a per-row float-qparams weight fake quant (torch.ao.nn.qat.EmbeddingBag)."""

    _FLOAT_MODULE: ClassVar[type[nn.Module]] = nn.EmbeddingBag

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                 _weight: torch.Tensor | None = None, include_last_offset: bool = False,
                 padding_idx: int | None = None, qconfig: Any = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        fake_quant = _embedding_fake_quant(type(self).__name__, qconfig, device)
        super().__init__(num_embeddings, embedding_dim, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                         _weight, include_last_offset, padding_idx, device=device, dtype=dtype)
        self.qconfig = qconfig
        self.weight_fake_quant = fake_quant

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Pool rows of ``weight_fake_quant(weight)`` selected by ``input`` / ``offsets``."""
        return F.embedding_bag(input, self.weight_fake_quant(self.weight), offsets, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.mode, self.sparse, per_sample_weights,
                               self.include_last_offset, self.padding_idx)

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> EmbeddingBag:
        """Build from a float ``nn.EmbeddingBag`` carrying ``mod.qconfig``; the table is shared (same storage)."""
        qconfig = check_float_module(cls, mod)
        return cls(mod.num_embeddings, mod.embedding_dim, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq,
                   mod.mode, mod.sparse, mod.weight, mod.include_last_offset, mod.padding_idx, qconfig=qconfig)

    def to_float(self) -> nn.EmbeddingBag:
        """A float ``nn.EmbeddingBag`` holding a detached copy of the table."""
        bag = nn.EmbeddingBag(self.num_embeddings, self.embedding_dim, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.mode, self.sparse, None, self.include_last_offset,
                              self.padding_idx)
        bag.weight = detached_param(self.weight)
        return bag.train(self.training)
