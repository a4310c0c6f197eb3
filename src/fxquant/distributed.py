"""Keep observer statistics identical across data-parallel ranks.

Each rank of a data-parallel job calibrates (or trains) on its own shard, so its observers see only part of the
data and compute different scale / zero point. :func:`sync_observers` all-reduces the statistics so that every rank
ends with the same observers:

==============================================  ===============================================================
observer (or the observer inside a fake quant)   rule
==============================================  ===============================================================
MinMaxObserver, PerChannelMinMaxObserver         ``min_val``: all-reduce MIN, ``max_val``: MAX. Exactly what one
                                                 process calibrated on the union of the shards would hold.
MovingAverage(PerChannel)MinMaxObserver          mean over the ranks that saw data (element-wise). A moving
                                                 average depends on batch order, so there is no exact union.
HistogramObserver                                range: MIN / MAX; each rank re-bins its histogram onto the common
                                                 range (torch.ao's upsampling rule), then the histograms are summed.
                                                 Range and total count are exact. torch.ao's histogram (and so its
                                                 clipping range) depends on batch order; the synced clipping range
                                                 lies within the spread of single-process runs over different
                                                 orders of the same batches, +-1% of the bins (tested).
Placeholder / Noop / FixedQParams / Recording /  nothing to sync
ReuseInput observers
==============================================  ===============================================================

Fake quants (modules holding an ``activation_post_process`` observer and ``scale`` / ``zero_point`` buffers) get
their ``scale`` / ``zero_point`` recomputed from the synced observer. All statistics travel in a handful of
bucketed collectives, whatever the model size.

Before any statistic moves, the ranks compare a hash of their observer names, classes and settings; if they differ
every rank raises :class:`ObserverSyncError` naming the observers that differ (instead of deadlocking or mixing
unrelated statistics).

Under ``DistributedDataParallel``: DDP broadcasts rank 0's buffers (observer statistics included) at every forward
unless ``broadcast_buffers=False``; with the default, the other ranks' statistics are overwritten each step. For
calibration or QAT, wrap with ``broadcast_buffers=False`` and sync explicitly: after calibration
(``with ObserverSync(model): ...``), before ``convert_fx``, and optionally every N training steps
(``ObserverSync(model, every_n_steps=N).attach()``). Every rank must make the same sync calls.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterator
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fxquant import observer as obs_mod
from fxquant._histogram import merge_histograms

__all__ = ["ObserverSyncError", "SyncMode", "register_observer_sync", "sync_observers", "observers_in_sync",
           "ObserverSync"]

Rule = Callable[[nn.Module, "_Buckets"], Generator[None, None, None]]


class ObserverSyncError(RuntimeError):
    """Observers cannot be synced: no process group, ranks disagree on the observers, or an unknown observer type."""


class SyncMode(str, Enum):
    """How an observer class is synced (see the module docstring)."""

    MIN_MAX = "min_max"
    MEAN = "mean"
    HISTOGRAM = "histogram"
    SKIP = "skip"


class _Buckets:
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


def _agree_on_channels(buffers: list[torch.Tensor], empty: list[float], b: _Buckets) -> Generator[None, None, None]:
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


def _sync_min_max(o: nn.Module, b: _Buckets) -> Generator[None, None, None]:
    yield from _agree_on_channels([o.min_val, o.max_val], [float("inf"), float("-inf")], b)
    b.add(dist.ReduceOp.MIN, o.min_val)
    b.add(dist.ReduceOp.MAX, o.max_val)
    yield


def _sync_mean(o: nn.Module, b: _Buckets) -> Generator[None, None, None]:
    yield from _agree_on_channels([o.min_val, o.max_val], [float("inf"), float("-inf")], b)
    seen = torch.isfinite(o.min_val) & torch.isfinite(o.max_val)
    sums = torch.stack([o.min_val.where(seen, 0.0), o.max_val.where(seen, 0.0), seen.to(o.min_val.dtype)])
    b.add(dist.ReduceOp.SUM, sums)
    yield
    count = sums[2]
    anyone = count > 0
    o.min_val.copy_(torch.where(anyone, sums[0] / count.clamp_min(1), torch.full_like(count, float("inf"))))
    o.max_val.copy_(torch.where(anyone, sums[1] / count.clamp_min(1), torch.full_like(count, float("-inf"))))


def _sync_histogram(o: nn.Module, b: _Buckets) -> Generator[None, None, None]:
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


def _skip(o: nn.Module, b: _Buckets) -> Generator[None, None, None]:
    yield from ()


_RULES: dict[SyncMode, Rule] = {
    SyncMode.MIN_MAX: _sync_min_max, SyncMode.MEAN: _sync_mean, SyncMode.HISTOGRAM: _sync_histogram,
    SyncMode.SKIP: _skip,
}

_MODES: dict[type, SyncMode] = {
    obs_mod.MinMaxObserver: SyncMode.MIN_MAX,
    obs_mod.PerChannelMinMaxObserver: SyncMode.MIN_MAX,
    obs_mod.MovingAverageMinMaxObserver: SyncMode.MEAN,
    obs_mod.MovingAveragePerChannelMinMaxObserver: SyncMode.MEAN,
    obs_mod.HistogramObserver: SyncMode.HISTOGRAM,
    obs_mod.PlaceholderObserver: SyncMode.SKIP,
    obs_mod.NoopObserver: SyncMode.SKIP,
    obs_mod.FixedQParamsObserver: SyncMode.SKIP,
    obs_mod.RecordingObserver: SyncMode.SKIP,
    obs_mod.ReuseInputObserver: SyncMode.SKIP,
}


def register_observer_sync(observer_cls: type, mode: SyncMode | str) -> None:
    """Declare how a custom observer class (and its subclasses) is synced: ``"min_max"`` (it has ``min_val`` /
    ``max_val`` buffers combined by min / max), ``"mean"``, ``"histogram"`` or ``"skip"``."""
    if not (isinstance(observer_cls, type) and issubclass(observer_cls, nn.Module)):
        raise TypeError(f"register_observer_sync: expected an observer class, got {observer_cls!r}")
    _MODES[observer_cls] = SyncMode(mode)


def _mode_of(module: nn.Module) -> SyncMode | None:
    for cls in type(module).__mro__:
        if cls in _MODES:
            return _MODES[cls]
    return None


def _observers(model: nn.Module) -> list[tuple[str, nn.Module, SyncMode]]:
    found, unknown = [], []
    for name, module in model.named_modules():
        if not isinstance(module, obs_mod.ObserverBase):
            continue
        mode = _mode_of(module)
        if mode is None:
            unknown.append(f"{name or '<root>'} ({type(module).__name__})")
        else:
            found.append((name, module, mode))
    if unknown:
        raise ObserverSyncError(f"sync_observers does not know how to combine {', '.join(unknown)}; call "
                                f"fxquant.distributed.register_observer_sync(YourObserver, 'min_max' | 'mean' | "
                                f"'histogram' | 'skip') first")
    return found


def _settings(module: nn.Module) -> str:
    keys = ("dtype", "qscheme", "quant_min", "quant_max", "ch_axis", "bins", "averaging_constant")
    return ",".join(f"{k}={getattr(module, k)}" for k in keys if hasattr(module, k))


def _signature_lines(found: list[tuple[str, nn.Module, SyncMode]]) -> list[str]:
    return [f"{name}: {type(m).__name__}[{mode.value}] {_settings(m)}" for name, m, mode in found]


def _comm_device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_same_observers(lines: list[str], group: Any, device: torch.device) -> None:
    digest = hashlib.sha256("\n".join(lines).encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if all(bool(g == gathered[0]) for g in gathered):
        return
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, lines, group=group)
    base = set(per_rank[0])
    diffs = []
    for rank, other in enumerate(per_rank[1:], start=1):
        only_0, only_r = sorted(base - set(other)), sorted(set(other) - base)
        diffs.append(f"rank 0 only: {only_0[:5]}; rank {rank} only: {only_r[:5]}")
    raise ObserverSyncError("ranks disagree on the set of observers (same model, prepared the same way, on every "
                            "rank?): " + " | ".join(diffs))


def _refresh_fake_quants(model: nn.Module) -> None:
    """Recompute ``scale`` / ``zero_point`` of every fake quant whose observer was synced and holds data."""
    for module in model.modules():
        inner = getattr(module, "activation_post_process", None)
        if not (isinstance(inner, obs_mod.ObserverBase) and hasattr(module, "scale")
                and hasattr(module, "zero_point") and _mode_of(inner) not in (None, SyncMode.SKIP)):
            continue
        lo = getattr(inner, "min_val", None)
        if lo is None or lo.numel() == 0 or not bool(torch.isfinite(lo).any()):
            continue
        scale, zero_point = inner.calculate_qparams()
        for buf, new in ((module.scale, scale), (module.zero_point, zero_point)):
            buf.resize_(new.shape).copy_(new.to(buf.device))


def _run_rules(found: list[tuple[str, nn.Module, SyncMode]], buckets: _Buckets) -> None:
    """Advance every rule generator one round at a time; one bucket flush per round on every rank."""
    active: list[Iterator[None]] = [_RULES[mode](m, buckets) for _, m, mode in found]
    while active:
        still = []
        for gen in active:
            try:
                next(gen)
                still.append(gen)
            except StopIteration:
                pass
        buckets.flush()
        active = still


def sync_observers(model: nn.Module, group: Any = None) -> int:
    """All-reduce the statistics of every observer / fake quant in ``model`` across the ranks of ``group``.

    Every rank must call it at the same point with the same model structure. Returns the number of observers
    whose statistics were combined. Raises :class:`ObserverSyncError` (on every rank alike) when
    ``torch.distributed`` is not initialised, an observer type has no sync rule, or the ranks hold different
    observers.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ObserverSyncError("sync_observers needs an initialised default process group: call "
                                "torch.distributed.init_process_group(...) first (single-process runs need no sync)")
    with torch.no_grad():
        found = _observers(model)
        device = _comm_device(group)
        _check_same_observers(_signature_lines(found), group, device)
        _run_rules(found, _Buckets(group, device))
        _refresh_fake_quants(model)
    return sum(1 for _, _, mode in found if mode is not SyncMode.SKIP)


def observers_in_sync(model: nn.Module, group: Any = None) -> bool:
    """True when every rank holds bit-identical observer / fake-quant buffers (a cheap check before convert)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ObserverSyncError("observers_in_sync needs an initialised default process group")
    hasher = hashlib.sha256()
    for name, module, _ in _observers(model):
        for key, buf in sorted(module.state_dict().items()):
            hasher.update(f"{name}.{key}".encode())
            hasher.update(buf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    value = int.from_bytes(hasher.digest()[:8], "little", signed=True)
    device = _comm_device(group)
    both = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return int(both[0]) == value and -int(both[1]) == value


class ObserverSync:
    """Sync points for observers under data parallelism.

    * ``with ObserverSync(model): calibrate()`` syncs once when the block ends without an exception.
    * ``sync = ObserverSync(model, every_n_steps=100)``; call ``sync.step()`` after each optimizer step (or
      ``sync.attach()`` to count forward passes of ``model`` instead); it syncs every N steps.
    * ``sync.sync()`` syncs now (call it before ``convert_fx``).

    Every rank must hit the same sync points (same number of steps / forwards), as with any collective.
    """

    def __init__(self, model: nn.Module, every_n_steps: int | None = None, group: Any = None) -> None:
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"ObserverSync: every_n_steps must be a positive int or None, got {every_n_steps!r}")
        self.model, self.every_n_steps, self.group = model, every_n_steps, group
        self.steps = 0
        self._handle: Any = None

    def sync(self) -> int:
        """Sync now; returns the number of observers combined."""
        return sync_observers(self.model, self.group)

    def step(self) -> bool:
        """Count one step; sync when the count reaches a multiple of ``every_n_steps``. True if it synced."""
        self.steps += 1
        if self.every_n_steps is not None and self.steps % self.every_n_steps == 0:
            self.sync()
            return True
        return False

    def attach(self) -> ObserverSync:
        """Call :meth:`step` after every forward of ``model`` (training mode only); undo with :meth:`detach`."""
        if self._handle is None:
            self._handle = self.model.register_forward_hook(self._after_forward)
        return self

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training:
            self.step()

    def detach(self) -> None:
        """Remove the forward hook installed by :meth:`attach`."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> ObserverSync:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.detach()
        if exc_type is None:
            self.sync()
