"""Reference quantized Embedding / EmbeddingBag: quantized rows, float lookup of the dequantized table."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.nn.quantized.reference._module import ReferenceWeightMixin

__all__ = ["Embedding", "EmbeddingBag"]


class Embedding(ReferenceWeightMixin, nn.Embedding):
    """``F.embedding`` on the dequantized table (``per_channel_affine_float_qparams`` rows, axis 0, usually)."""

    _IS_REFERENCE = True

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, device: Any = None, dtype: torch.dtype | None = None,
                 weight_qparams: Mapping[str, Any] | None = None) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                              scale_grad_by_freq, sparse, device=device, dtype=dtype)
        self._attach_weight("weight", self._parameters["weight"], weight_qparams)  # type: ignore[arg-type]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.get_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    @classmethod
    def from_float(cls, mod: nn.Embedding, weight_qparams: Mapping[str, Any],
                   keep_original_weights: bool = False) -> Embedding:
        """Quantize ``mod``'s table with ``weight_qparams`` (torch.ao's dict)."""
        if not isinstance(mod, nn.Embedding):
            raise TypeError(f"Embedding.from_float expects an nn.Embedding, got {type(mod).__name__}")
        ref = cls(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, mod.max_norm, mod.norm_type,
                  mod.scale_grad_by_freq, mod.sparse, device="meta", dtype=mod.weight.dtype)
        ref._attach_weight("weight", mod.weight, weight_qparams, keep_original_weights)
        return ref


class EmbeddingBag(ReferenceWeightMixin, nn.EmbeddingBag):
    """``F.embedding_bag`` on the dequantized table."""

    _IS_REFERENCE = True

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                 sparse: bool = False, include_last_offset: bool = False, padding_idx: int | None = None,
                 device: Any = None, dtype: torch.dtype | None = None,
                 weight_qparams: Mapping[str, Any] | None = None) -> None:
        nn.EmbeddingBag.__init__(self, num_embeddings, embedding_dim, max_norm, norm_type, scale_grad_by_freq,
                                 mode, sparse, None, include_last_offset, padding_idx, device=device, dtype=dtype)
        self._attach_weight("weight", self._parameters["weight"], weight_qparams)  # type: ignore[arg-type]

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        return F.embedding_bag(input, self.get_weight(), offsets, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.mode, self.sparse, per_sample_weights,
                               self.include_last_offset, self.padding_idx)

    @classmethod
    def from_float(cls, mod: nn.EmbeddingBag, weight_qparams: Mapping[str, Any],
                   keep_original_weights: bool = False) -> EmbeddingBag:
        """Quantize ``mod``'s table with ``weight_qparams`` (torch.ao's dict)."""
        if not isinstance(mod, nn.EmbeddingBag):
            raise TypeError(f"EmbeddingBag.from_float expects an nn.EmbeddingBag, got {type(mod).__name__}")
        ref = cls(mod.num_embeddings, mod.embedding_dim, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq,
                  mod.mode, mod.sparse, mod.include_last_offset, mod.padding_idx, device="meta",
                  dtype=mod.weight.dtype)
        ref._attach_weight("weight", mod.weight, weight_qparams, keep_original_weights)
        return ref
