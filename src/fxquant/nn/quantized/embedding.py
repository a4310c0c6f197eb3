"""Lowered Embedding / EmbeddingBag with 8-bit or packed 4-bit rows (per-row scale and zero point), float out.

Built from a reference module whose table is quantized per row (``per_channel_affine_float_qparams`` axis 0, or
``per_channel_affine``): ``Embedding.from_reference(ref)``. A 0..15 table (torch.ao's ``quint4x2``) is packed two
values per byte (low nibble = even column). The forward gathers the requested rows, dequantizes only those
(``(q - zero_point) * scale``, the reference math) and, for bags, reduces them -- in one pass of the native kernel
(``fxquant.kernels.native.EmbeddingTable``: a quarter of fp32's bytes per row, no float copy of the table), else
with ``F.embedding_bag`` on the gathered rows or on a cached float table (the kernel rules in ``kernels/x86.py``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.kernels import native, x86

__all__ = ["Embedding", "EmbeddingBag"]


def _pack4(q: torch.Tensor) -> torch.Tensor:
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _unpack4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)[..., :dim]


class _QuantizedEmbeddingBase(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"{self._get_name()}: bits must be 4 or 8, got {bits}")
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        width = (embedding_dim + 1) // 2 if bits == 4 else embedding_dim  # placeholders until from_reference / load
        self.register_buffer("weight_packed", torch.zeros(num_embeddings, width, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))
        self.register_buffer("weight_zero_point", torch.zeros(num_embeddings))

    def _init_from(self, ref: Any) -> None:
        spec = getattr(ref, "_weight_specs", {}).get("weight")
        if spec is None or spec.granularity != "per_channel" or spec.axis != 0 or spec.quant_min is None:
            raise TypeError(f"{self._get_name()}.from_reference needs an fxquant reference embedding quantized per "
                            f"row (qscheme per_channel_affine_float_qparams, axis 0); got {type(ref).__name__} "
                            f"with {getattr(spec, 'qscheme_name', 'no weight spec')}")
        q = ref.weight_int
        self.register_buffer("weight_packed", _pack4(q) if self.bits == 4 else q.detach().clone())
        self.register_buffer("weight_scale", ref.weight_scale.detach().float().clone())
        self.register_buffer("weight_zero_point", ref.weight_zero_point.detach().float().clone())

    @staticmethod
    def _bits_of(ref: Any) -> int:
        spec = getattr(ref, "_weight_specs", {}).get("weight")
        return 4 if spec is not None and spec.dtype == torch.uint8 and spec.quant_max == 15 else 8

    def kernel(self) -> str:
        """The kernel rules' choice for this table (cached; plain aten ops while compiling / exporting):
        ``"native"`` (one fused gather-dequantize-reduce pass), ``"cached_float"`` or ``"gather"``."""
        if torch.compiler.is_compiling():
            return "gather"
        cache = self.__dict__.setdefault("_kernel_cache", {})
        if "kernel" not in cache:
            packed = self.weight_packed
            facts = x86.Facts(device=packed.device.type, table_bytes=4 * self.num_embeddings * self.embedding_dim,
                              native_ok=packed.is_contiguous() and self.weight_scale.dtype == torch.float32
                              and self.weight_zero_point.dtype == torch.float32)
            cache["kernel"] = x86.choose("embedding", facts)
        return cache["kernel"]  # type: ignore[no-any-return]

    def float_table(self) -> torch.Tensor | None:
        """The whole dequantized table, cached, when the kernel rules pick that (eager mode, no native kernels,
        small tables)."""
        if self.kernel() != "cached_float":
            return None
        cache = self.__dict__["_kernel_cache"]
        if "table" not in cache:
            cache["table"] = self.rows(torch.arange(self.num_embeddings, device=self.weight_packed.device))
        return cache["table"]  # type: ignore[no-any-return]

    def _native_bags(self, indices: torch.Tensor, offsets: torch.Tensor | None, mode: str,
                     include_last_offset: bool = False, per_sample_weights: torch.Tensor | None = None,
                     padding_idx: int | None = None) -> torch.Tensor | None:
        buffers, cache = self._buffers, self.__dict__["_kernel_cache"]
        table, scale, zero_point = buffers["weight_packed"], buffers["weight_scale"], buffers["weight_zero_point"]
        plan = cache.get("native")
        if plan is None or not plan.holds(table, scale, zero_point):  # built once; again if a buffer is replaced
            plan = cache["native"] = native.EmbeddingTable(table, scale, zero_point, self.embedding_dim, self.bits)
        return plan(indices, offsets, mode, include_last_offset, per_sample_weights, padding_idx)  # type: ignore

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_kernel_cache"] = {}
        return state

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Dequantized rows for ``indices`` (any shape) -> ``indices.shape + (embedding_dim,)``."""
        flat = indices.reshape(-1)
        q = self.weight_packed.index_select(0, flat)
        if self.bits == 4:
            q = _unpack4(q, self.embedding_dim)
        scale = self.weight_scale.index_select(0, flat).unsqueeze(1)
        zp = self.weight_zero_point.index_select(0, flat).unsqueeze(1)
        return ((q.float() - zp) * scale).reshape(*indices.shape, self.embedding_dim)

    def get_extra_state(self) -> dict[str, Any]:
        return {"bits": self.bits}

    def set_extra_state(self, state: Any) -> None:
        self.bits = int(state["bits"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name, current in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and current is not None and (saved.shape != current.shape
                                                                            or saved.dtype != current.dtype):
                self._buffers[name] = torch.empty_like(saved)
        self.__dict__["_kernel_cache"] = {}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"

    def _get_name(self) -> str:
        return f"Quantized{type(self).__name__}"


class Embedding(_QuantizedEmbeddingBase):
    """Quantized Embedding: ``F.embedding`` on the dequantized table, computed only for the looked-up rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8) -> None:
        super().__init__(num_embeddings, embedding_dim, bits)

    @classmethod
    def from_reference(cls, ref: Any) -> Embedding:
        """Build from a reference ``Embedding`` (``max_norm`` is not supported: it rewrites the table)."""
        if getattr(ref, "max_norm", None) is not None:
            raise ValueError("QuantizedEmbedding: max_norm renormalises the table in place; keep such an embedding "
                             "in reference form")
        mod = cls(ref.num_embeddings, ref.embedding_dim, cls._bits_of(ref))
        mod._init_from(ref)
        return mod

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.kernel() == "native":  # each index its own bag of one
            out = self._native_bags(indices.reshape(-1, 1), None, "sum")
            assert out is not None
            return out.reshape(*indices.shape, self.embedding_dim)
        table = self.float_table()
        return self.rows(indices) if table is None else F.embedding(indices, table)


class EmbeddingBag(_QuantizedEmbeddingBase):
    """Quantized EmbeddingBag (modes sum / mean / max, offsets, per-sample weights, padding_idx)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, mode: str = "mean",
                 include_last_offset: bool = False, padding_idx: int | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, bits)
        self.mode, self.include_last_offset, self.padding_idx = mode, include_last_offset, padding_idx

    @classmethod
    def from_reference(cls, ref: Any) -> EmbeddingBag:
        """Build from a reference ``EmbeddingBag``."""
        if getattr(ref, "max_norm", None) is not None:
            raise ValueError("QuantizedEmbeddingBag: max_norm renormalises the table in place; keep such an "
                             "embedding bag in reference form")
        mod = cls(ref.num_embeddings, ref.embedding_dim, cls._bits_of(ref), ref.mode, ref.include_last_offset,
                  ref.padding_idx)
        mod._init_from(ref)
        return mod

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel() == "native":
            out = self._native_bags(input, offsets, self.mode, self.include_last_offset, per_sample_weights,
                                    self.padding_idx)
            if out is not None:
                return out
        table = self.float_table()
        if table is not None:
            return F.embedding_bag(input, table, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                                   include_last_offset=self.include_last_offset, padding_idx=self.padding_idx)
        rows = self.rows(input)
        n = input.numel()
        table = rows.reshape(n, self.embedding_dim)
        positions = torch.arange(n, device=input.device).reshape(input.shape)
        padding_idx = None
        if self.padding_idx is not None:  # padded entries point at an extra row that the bag skips
            table = torch.cat((table, table.new_zeros(1, self.embedding_dim)))
            positions = torch.where(input == self.padding_idx, torch.full_like(positions, n), positions)
            padding_idx = n
        return F.embedding_bag(positions, table, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset, padding_idx=padding_idx)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "mode": self.mode, "include_last_offset": self.include_last_offset,
                "padding_idx": self.padding_idx}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.mode, self.include_last_offset = state["mode"], bool(state["include_last_offset"])
        self.padding_idx = state["padding_idx"]
