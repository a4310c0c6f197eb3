"""How each kind of statistic is combined across ranks (the rules behind :mod:`fxquant.distributed`).

A rule is a generator over one module: it adds tensors to a :class:`Buckets` (all-reduced in place, one flat
tensor per (op, dtype)), yields, and after the flush writes the combined values back. Rules with two rounds (agree
on a shape, then reduce) yield twice. Every rank runs the same rules in the same order, so the collectives match.
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fxquant._histogram import merge_histograms

__all__ = ["SyncMode", "ObserverSyncError", "Buckets", "RULES"]


class ObserverSyncError(RuntimeError):
    """Statistics cannot be synced: no process group, ranks disagree on the model, or an unknown observer type."""


class SyncMode(str, Enum):
    """How a module's statistics are synced (see :mod:`fxquant.distributed`)."""

    MIN_MAX = "min_max"
    MEAN = "mean"
    HISTOGRAM = "histogram"
    BATCH_NORM = "batch_norm"
    SKIP = "skip"


class Buckets:
    """Tensors to all-reduce in place, grouped by (op, dtype) and sent as one flat tensor per group."""

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group, self.device = group, device
        self.pending: dict[tuple[Any, torch.dtype], list[torch.Tensor]] = {}

    def add(self, op: Any, tensor: torch.Tensor) -> None:
        self.pending.setdefault((op, tensor.dtype), []).append(tensor)

    def flush(self) -> None:
        for (op, _), tensors in sorted(self.pending.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
            flat = torch.cat([t.reshape(-1).to(self.device) for t in tensors])
            dist.all_reduce(flat, op=op, group=self.group)
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(part.reshape(t.shape))
        self.pending = {}


Rule = Callable[[nn.Module, Buckets], Generator[None, None, None]]


def _agree_on_channels(buffers: list[torch.Tensor], empty: list[float], b: Buckets) -> Generator[None, None, None]:
    """Give uninitialised 1-d buffers (shape ``(0,)``) the channel count the other ranks have (filled with
    ``empty``); raise on every rank alike if two ranks saw different channel counts."""
    n = buffers[0].numel() if buffers[0].dim() > 0 else -1
    counts = torch.tensor([n, -n if n > 0 else -(2 ** 62)], dtype=torch.int64)
    b.add(dist.ReduceOp.MAX, counts)
    yield
    most, least = int(counts[0]), -int(counts[1])
    if most > 0 and least != most:
        raise ObserverSyncError(f"ranks observed different channel counts ({least} and {most}) for the same "
                                f"per-channel observer")
    if n == 0 and most > 0:
        for buf, fill in zip(buffers, empty):
            buf.resize_(most).fill_(fill)


def _sync_min_max(o: nn.Module, b: Buckets) -> Generator[None, None, None]:
    yield from _agree_on_channels([o.min_val, o.max_val], [float("inf"), float("-inf")], b)
    b.add(dist.ReduceOp.MIN, o.min_val)
    b.add(dist.ReduceOp.MAX, o.max_val)
    yield


def _sync_mean(o: nn.Module, b: Buckets) -> Generator[None, None, None]:
    yield from _agree_on_channels([o.min_val, o.max_val], [float("inf"), float("-inf")], b)
    seen = torch.isfinite(o.min_val) & torch.isfinite(o.max_val)
    sums = torch.stack([o.min_val.where(seen, 0.0), o.max_val.where(seen, 0.0), seen.to(o.min_val.dtype)])
    b.add(dist.ReduceOp.SUM, sums)
    yield
    count = sums[2]
    anyone = count > 0
    o.min_val.copy_(torch.where(anyone, sums[0] / count.clamp_min(1), torch.full_like(count, float("inf"))))
    o.max_val.copy_(torch.where(anyone, sums[1] / count.clamp_min(1), torch.full_like(count, float("-inf"))))


def _sync_histogram(o: nn.Module, b: Buckets) -> Generator[None, None, None]:
    lo, hi = o.min_val.detach().clone(), o.max_val.detach().clone()
    b.add(dist.ReduceOp.MIN, lo)
    b.add(dist.ReduceOp.MAX, hi)
    yield
    has_data = bool(torch.isfinite(o.min_val)) and bool(torch.isfinite(o.max_val))
    hist = torch.zeros_like(o.histogram)
    if has_data:
        hist = merge_histograms(o.histogram, o.min_val, o.max_val, hist, lo, hi).to(o.histogram.dtype)
    b.add(dist.ReduceOp.SUM, hist)
    yield
    o.histogram.copy_(hist)
    o.min_val.copy_(lo)
    o.max_val.copy_(hi)


def _sync_batch_norm(m: nn.Module, b: Buckets) -> Generator[None, None, None]:
    """Running mean / variance: the mean over the ranks; ``num_batches_tracked``: the maximum."""
    stats = torch.stack([m.running_mean.detach(), m.running_var.detach()])
    b.add(dist.ReduceOp.SUM, stats)
    tracked = m.num_batches_tracked
    count = None if tracked is None else tracked.detach().clone().reshape(1)
    if count is not None:
        b.add(dist.ReduceOp.MAX, count)
    yield
    stats /= dist.get_world_size(b.group)
    m.running_mean.copy_(stats[0])
    m.running_var.copy_(stats[1])
    if count is not None:
        tracked.copy_(count.reshape(tracked.shape))


def _skip(o: nn.Module, b: Buckets) -> Generator[None, None, None]:
    yield from ()


RULES: dict[SyncMode, Rule] = {
    SyncMode.MIN_MAX: _sync_min_max, SyncMode.MEAN: _sync_mean, SyncMode.HISTOGRAM: _sync_histogram,
    SyncMode.BATCH_NORM: _sync_batch_norm, SyncMode.SKIP: _skip,
}
