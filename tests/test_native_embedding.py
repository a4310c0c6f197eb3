"""The native embedding-bag kernel (fxquant.kernels.native.EmbeddingTable) and its place in the lowered Embedding /
EmbeddingBag: equal to F.embedding_bag on the dequantized table for every mode, bit width, padding, weighting and
bag layout; clear errors; aten's own kernel where aten's rules are irregular; no float copy of the table."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.kernels import native, x86
from fxquant.nn import quantized as Q
from fxquant.nn.quantized import reference as R

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


def _table(rows: int, dim: int, bits: int, seed: int = 0):
    """(packed uint8 table, scale, zero point, the dequantized float table)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (rows, dim), generator=g, dtype=torch.uint8)
    scale = torch.rand(rows, generator=g) * 0.1 + 1e-3
    zero_point = torch.randn(rows, generator=g) * 3  # float zero points, as float_qparams tables have
    dequantized = (q.float() - zero_point[:, None]) * scale[:, None]
    if bits == 4:
        padded = torch.nn.functional.pad(q, (0, dim % 2))
        q = (padded[:, 0::2] | (padded[:, 1::2] << 4)).contiguous()
    return q, scale, zero_point, dequantized


@needs_native
@pytest.mark.parametrize("bits,dim", [(8, 37), (8, 64), (8, 200), (4, 37), (4, 16), (4, 75)])
def test_equals_embedding_bag_on_the_dequantized_table(bits: int, dim: int) -> None:
    rows = 300
    packed, scale, zp, table = _table(rows, dim, bits)
    plan = native.EmbeddingTable(packed, scale, zp, dim, bits)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, rows, (50,), generator=g)
    idx[3] = idx[10] = 7  # a padding row inside a bag, twice
    offsets = torch.tensor([0, 0, 5, 12, 12, 30, 49])  # empty bags, a bag of one at the end
    for mode, last, pad, weighted, dtype in itertools.product(("sum", "mean", "max"), (False, True), (None, 7),
                                                              (False, True), (torch.int64, torch.int32)):
        if weighted and mode != "sum":
            continue
        offs = torch.cat([offsets, torch.tensor([50])]) if last else offsets
        w = torch.randn(50, generator=g) if weighted else None
        ref = F.embedding_bag(idx, table, offs, mode=mode, include_last_offset=last, padding_idx=pad,
                              per_sample_weights=w)
        got = plan(idx.to(dtype), offs.to(dtype), mode, last, w, pad)
        assert got is not None and torch.equal(got, ref), (mode, last, pad, weighted, dtype)
    fixed = torch.randint(0, rows, (6, 4), generator=g)  # 2-d: one bag per row
    for mode in ("sum", "mean", "max"):
        assert torch.equal(plan(fixed, None, mode), F.embedding_bag(fixed, table, mode=mode))


@needs_native
def test_many_threads_give_the_single_thread_result() -> None:
    packed, scale, zp, table = _table(5000, 64, 8)
    plan = native.EmbeddingTable(packed, scale, zp, 64, 8)
    idx = torch.randint(0, 5000, (256, 20))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = plan(idx, None, "mean")
        torch.set_num_threads(2)
        two = plan(idx, None, "mean")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(one, F.embedding_bag(idx, table, mode="mean"))


@needs_native
def test_bad_input_is_named() -> None:
    packed, scale, zp, _ = _table(10, 8, 8)
    plan = native.EmbeddingTable(packed, scale, zp, 8, 8)
    with pytest.raises(IndexError, match="outside the table's 10 rows"):
        plan(torch.tensor([1, 10]), torch.tensor([0]), "sum")
    with pytest.raises(IndexError, match="outside"):
        plan(torch.tensor([-1, 2]), torch.tensor([0]), "sum")
    with pytest.raises(ValueError, match="never decrease"):
        plan(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]), "sum")
    with pytest.raises(ValueError, match="need mode='sum'"):
        plan(torch.tensor([1, 2]), torch.tensor([0]), "mean", per_sample_weights=torch.ones(2))
    with pytest.raises(ValueError, match="2 values for 3 indices"):
        plan(torch.tensor([1, 2, 3]), torch.tensor([0]), "sum", per_sample_weights=torch.ones(2))
    with pytest.raises(ValueError, match="offsets must be None"):
        plan(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0]), "sum")
    with pytest.raises(ValueError, match="contiguous uint8"):
        native.EmbeddingTable(packed.float(), scale, zp, 8, 8)
    with pytest.raises(ValueError, match="scale must be contiguous float32"):
        native.EmbeddingTable(packed, scale.double(), zp, 8, 8)


@needs_native
def test_a_short_last_offset_is_left_to_aten() -> None:
    """With include_last_offset and a last offset before the indices' end aten's modes disagree on the last bag
    (mean divides by the count to the end); the kernel declines and the module runs aten's kernel."""
    packed, scale, zp, _ = _table(20, 8, 8)
    plan = native.EmbeddingTable(packed, scale, zp, 8, 8)
    idx, offs = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 4])
    assert plan(idx, offs, "mean", include_last_offset=True) is None
    float_bag = nn.EmbeddingBag(20, 8, mode="mean", include_last_offset=True)
    ref = _bag_reference(float_bag)
    mod = Q.EmbeddingBag.from_reference(ref)
    assert mod.kernel() == "native"
    assert torch.equal(mod(idx, offs), ref(idx, offs))


def _bag_reference(float_mod: nn.Module, qmax: int = 255):
    w = float_mod.weight.detach()
    lo, hi = w.amin(1).clamp_max(0), w.amax(1).clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    dtype = getattr(torch, "quint4x2" if qmax == 15 else "quint8")
    cls = R.EmbeddingBag if isinstance(float_mod, nn.EmbeddingBag) else R.Embedding
    return cls.from_float(float_mod, {"qscheme": torch.per_channel_affine_float_qparams, "dtype": dtype,
                                      "scale": scale, "zero_point": -lo / scale, "axis": 0})


@needs_native
@pytest.mark.parametrize("qmax", [255, 15])
def test_lowered_modules_run_the_kernel_without_a_float_table(qmax: int) -> None:
    torch.manual_seed(3)
    bag_ref = _bag_reference(nn.EmbeddingBag(40, 24, mode="sum", padding_idx=5), qmax)
    emb_ref = _bag_reference(nn.Embedding(40, 24), qmax)
    bag, emb = Q.EmbeddingBag.from_reference(bag_ref), Q.Embedding.from_reference(emb_ref)
    idx, offs = torch.randint(0, 40, (30,)), torch.tensor([0, 4, 4, 17])
    assert torch.equal(bag(idx, offs), bag_ref(idx, offs))
    idx2 = torch.randint(0, 40, (3, 5, 2))
    assert torch.equal(emb(idx2), emb_ref(idx2)) and emb(idx2).shape == (3, 5, 2, 24)
    assert emb(torch.zeros(0, dtype=torch.long)).shape == (0, 24)
    for mod in (bag, emb):
        assert mod.kernel() == "native" and "table" not in mod.__dict__["_kernel_cache"]
        assert mod.float_table() is None


@needs_native
def test_a_replaced_or_loaded_table_is_what_runs() -> None:
    torch.manual_seed(4)
    bag = Q.EmbeddingBag.from_reference(_bag_reference(nn.EmbeddingBag(30, 16, mode="sum")))
    other_ref = _bag_reference(nn.EmbeddingBag(30, 16, mode="sum"))
    other = Q.EmbeddingBag.from_reference(other_ref)
    idx = torch.randint(0, 30, (4, 3))
    before = bag(idx)
    bag.load_state_dict(other.state_dict())
    assert torch.equal(bag(idx), other_ref(idx)) and not torch.equal(bag(idx), before)
    bag.weight_scale = bag.weight_scale * 2  # a new tensor: the kernel's addresses are rebuilt
    assert torch.allclose(bag(idx), other_ref(idx) * 2, rtol=1e-6, atol=1e-6)
    clone = copy.deepcopy(bag)
    assert torch.equal(clone(idx), bag(idx))


def test_rules_fall_back_to_the_float_table_or_gather_without_native(monkeypatch) -> None:
    monkeypatch.setattr(native, "available", lambda: False)
    small = x86.Facts(device="cpu", table_bytes=4 * 1000 * 64, native_ok=True)
    assert x86.choose("embedding", small) == "cached_float"
    assert x86.choose("embedding", x86.Facts(device="cpu", table_bytes=2**30, native_ok=True)) == "gather"
    torch.manual_seed(5)
    bag_ref = _bag_reference(nn.EmbeddingBag(40, 8, mode="max"))
    bag = Q.EmbeddingBag.from_reference(bag_ref)
    idx = torch.randint(0, 40, (5, 3))
    assert bag.kernel() == "cached_float" and torch.equal(bag(idx), bag_ref(idx))
    monkeypatch.undo()
    if native.available():
        assert x86.choose("embedding", small) == "native"
        assert x86.choose("embedding", x86.Facts(device="cpu", table_bytes=2**30, native_ok=True)) == "native"
    assert x86.choose("embedding", x86.Facts(device="cpu", compiling=True, native_ok=True)) == "gather"
