"""Keep observer statistics identical across data-parallel ranks.

Each rank of a data-parallel job calibrates (or trains) on its own shard, so its observers see only part of the
data and compute different scale / zero point. :func:`sync_observers` all-reduces the statistics so that every rank
ends with the same observers:

==============================================  ===============================================================
module (or the observer inside a fake quant)     rule
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
BatchNorm (running statistics; QAT ConvBn /      ``running_mean`` / ``running_var``: mean over the ranks;
LinearBn keep one and fold it at convert)        ``num_batches_tracked``: MAX. With equal per-rank batch sizes the
                                                 mean is the running average of the global batch means; the
                                                 variance leaves out the spread between the ranks' batch means.
Placeholder / Noop / FixedQParams / Recording /  nothing to sync
ReuseInput observers
==============================================  ===============================================================

Fake quants (modules holding an ``activation_post_process`` observer and ``scale`` / ``zero_point`` buffers) get
their ``scale`` / ``zero_point`` recomputed from the synced observer. All statistics travel in a handful of
bucketed collectives, whatever the model size.

Before any statistic moves, the ranks compare a hash of their prepared graphs and of their observer names, classes
and settings; if they differ every rank raises :class:`ObserverSyncError` naming what differs (instead of
deadlocking or mixing unrelated statistics).

Under ``DistributedDataParallel``: DDP broadcasts rank 0's buffers (observer and batch-norm statistics included) at
every forward unless ``broadcast_buffers=False``; with the default, the other ranks' statistics are overwritten each
step. For calibration or QAT, wrap with ``broadcast_buffers=False`` and sync explicitly: after calibration
(``with ObserverSync(model): ...``), before ``convert_fx``, and optionally every N training steps
(``ObserverSync(model, every_n_steps=N).attach()``). Every rank must make the same sync calls.

``convert_fx`` does not run a collective: jobs commonly convert and save on rank 0 only, and a collective there
would hang until the process-group timeout. Instead, in a job with more than one rank, convert calls
:func:`warn_if_unsynced`, a local check (no communication) that warns when observer or batch-norm statistics
changed since this rank's last :func:`sync_observers`. :func:`observers_in_sync` is the exact, collective check.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from fxquant import observer as obs_mod
from fxquant._sync_rules import RULES, Buckets, ObserverSyncError, SyncMode

__all__ = ["ObserverSyncError", "SyncMode", "register_observer_sync", "sync_observers", "observers_in_sync",
           "warn_if_unsynced", "unsynced_modules", "UnsyncedObserversWarning", "ObserverSync"]

_SYNCED_ATTR = "_fxquant_synced_digest"  # on each synced module: digest of its statistics right after the sync


class UnsyncedObserversWarning(UserWarning):
    """convert_fx in a multi-rank job found statistics that were not synced across the ranks."""


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
    nn.modules.batchnorm._BatchNorm: SyncMode.BATCH_NORM,
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


def _tracks_batch_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None


def _synced_modules(model: nn.Module) -> list[tuple[str, nn.Module, SyncMode]]:
    """Every observer (inside fake quants too) and batch norm with running statistics, with its sync mode."""
    found, unknown = [], []
    for name, module in model.named_modules():
        if not (isinstance(module, obs_mod.ObserverBase) or _tracks_batch_stats(module)):
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
    keys = ("dtype", "qscheme", "quant_min", "quant_max", "ch_axis", "bins", "averaging_constant", "num_features")
    return ",".join(f"{k}={getattr(module, k)}" for k in keys if hasattr(module, k))


def _signature_lines(model: nn.Module, found: list[tuple[str, nn.Module, SyncMode]]) -> list[str]:
    graphs = [f"graph {name or '<root>'}: {hashlib.sha256(m.code.encode()).hexdigest()[:16]}"
              for name, m in model.named_modules() if isinstance(m, fx.GraphModule)]
    return graphs + [f"{name}: {type(m).__name__}[{mode.value}] {_settings(m)}" for name, m, mode in found]


def _comm_device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe_difference(per_rank: list[list[str]]) -> str:
    base = set(per_rank[0])
    graphs, diffs = False, []
    for rank, other in enumerate(per_rank[1:], start=1):
        only_0, only_r = sorted(base - set(other)), sorted(set(other) - base)
        graphs = graphs or any(line.startswith("graph ") for line in only_0 + only_r)
        diffs.append(f"rank 0 only: {only_0[:5]}; rank {rank} only: {only_r[:5]}")
    what = ("ranks disagree on the prepared graph (the same model, traced and prepared the same way, on every "
            "rank?)" if graphs else "ranks disagree on the set of observers (same model, prepared the same way, "
                                    "on every rank?)")
    return f"{what}: " + " | ".join(diffs)


def _check_same_model(lines: list[str], group: Any, device: torch.device) -> None:
    digest = hashlib.sha256("\n".join(lines).encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if all(bool(g == gathered[0]) for g in gathered):
        return
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, lines, group=group)
    raise ObserverSyncError(_describe_difference(per_rank))


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


def _run_rules(found: list[tuple[str, nn.Module, SyncMode]], buckets: Buckets) -> None:
    """Advance every rule generator one round at a time; one bucket flush per round on every rank."""
    active: list[Iterator[None]] = [RULES[mode](m, buckets) for _, m, mode in found]
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


def _digest(module: nn.Module) -> int:
    """A 64-bit hash of the module's own buffers (its statistics, not its parameters), bit for bit."""
    hasher = hashlib.sha256()
    for key, buf in sorted(module.named_buffers(recurse=False)):
        if buf is None:
            continue
        hasher.update(key.encode())
        hasher.update(buf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(hasher.digest()[:8], "little", signed=True)


def _require_process_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ObserverSyncError(f"{what} needs an initialised default process group: call "
                                "torch.distributed.init_process_group(...) first (single-process runs need no sync)")


def sync_observers(model: nn.Module, group: Any = None) -> int:
    """All-reduce the statistics of every observer / fake quant and batch norm in ``model`` across the ranks of
    ``group`` (rules in the module docstring).

    Every rank must call it at the same point with the same model structure. Returns the number of modules
    whose statistics were combined. Raises :class:`ObserverSyncError` (on every rank alike) when
    ``torch.distributed`` is not initialised, an observer type has no sync rule, or the ranks hold different
    graphs or observers.
    """
    _require_process_group("sync_observers")
    with torch.no_grad():
        found = _synced_modules(model)
        device = _comm_device(group)
        _check_same_model(_signature_lines(model, found), group, device)
        _run_rules(found, Buckets(group, device))
        _refresh_fake_quants(model)
        synced = [m for _, m, mode in found if mode is not SyncMode.SKIP]
        for module in synced:
            object.__setattr__(module, _SYNCED_ATTR, _digest(module))
    return len(synced)


def observers_in_sync(model: nn.Module, group: Any = None) -> bool:
    """True when every rank holds bit-identical observer / fake-quant / batch-norm statistics (one all-reduce)."""
    _require_process_group("observers_in_sync")
    hasher = hashlib.sha256()
    for name, module, _ in _synced_modules(model):
        hasher.update(f"{name}:{_digest(module)}".encode())
    value = int.from_bytes(hasher.digest()[:8], "little", signed=True)
    both = torch.tensor([value, -value], dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return int(both[0]) == value and -int(both[1]) == value


def unsynced_modules(model: nn.Module) -> list[str]:
    """Names of the observers / batch norms whose statistics changed since this rank's last
    :func:`sync_observers` (or that were never synced). Local: no communication."""
    return [name or "<root>" for name, module, mode in _synced_modules(model)
            if mode is not SyncMode.SKIP and getattr(module, _SYNCED_ATTR, None) != _digest(module)]


def warn_if_unsynced(model: nn.Module, what: str = "convert_fx") -> None:
    """In a job with more than one rank, warn (:class:`UnsyncedObserversWarning`) when statistics were not synced
    since they last changed: ranks that calibrated on different shards would convert to different qparams.
    Does nothing without an initialised process group of two or more ranks; never communicates."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    stale = unsynced_modules(model)
    if stale:
        more = f" (+{len(stale) - 5} more)" if len(stale) > 5 else ""
        warnings.warn(f"{what} on rank {dist.get_rank()} of {dist.get_world_size()}: {len(stale)} observer / "
                      f"batch-norm statistics changed since the last fxquant.distributed.sync_observers on this "
                      f"rank, or were never synced: {', '.join(stale[:5])}{more}. Call sync_observers(model) on "
                      f"every rank before converting (ignore this if every rank saw the same data).",
                      UnsyncedObserversWarning, stacklevel=3)


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
        """Sync now; returns the number of modules combined."""
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
