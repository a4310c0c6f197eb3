"""Calibration and QAT of prepared models with 2 gloo ranks on localhost, end to end through convert.

One fork runs every scenario (bounded: each collective times out after 60 s, the parent gives up after TIMEOUT_S).
Each rank converts its own model and writes the qparams and outputs it got to a JSON file; the parent checks that
the ranks agree bit for bit. On each rank, calibration is also compared with one process calibrating on the union
of the shards (computed locally: the data is deterministic):

* min / max observers: identical qparams, bit for bit;
* HistogramObserver (the x86 default): weights identical; activation scales within HIST_SCALE_TOLERANCE (relative)
  of the single-process scales. A histogram depends on the order it sees batches in (torch.ao's as well), so the
  union has no exact answer (fxquant.distributed's docstring; tests/test_distributed.py bounds it by the spread
  over batch orders).
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxquant
from dist_harness import run_workers
from fxquant import observer as O
from fxquant.distributed import (ObserverSyncError, ObserverSync, UnsyncedObserversWarning, observers_in_sync,
                                 sync_observers)
from fxquant.quantize_fx import convert_to_reference_fx, prepare_fx, prepare_qat_fx

WORLD = 2
TIMEOUT_S = 120
BATCHES = 3  # per rank
HIST_SCALE_TOLERANCE = 0.02  # measured here: 0 (identical scales); order effects are bounded in test_distributed.py


class Net(nn.Module):
    def __init__(self, extra_relu: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.extra_relu = extra_relu

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + y
        y = F.relu(F.relu(y)) if self.extra_relu else F.relu(y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _net(**kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs)


def _batch(rank: int, b: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * b + rank)
    return torch.randn(4, 3, 8, 8, generator=gen).pow(3) * (1 + rank)  # heavy tails, ranks differ in range


def _union() -> list[torch.Tensor]:
    return [_batch(r, b) for b in range(BATCHES) for r in range(WORLD)]


EXAMPLE = (_batch(0, 0),)
PROBE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
MINMAX = fxquant.QConfig(
    activation=O.MinMaxObserver.with_args(dtype=torch.uint8, reduce_range=True),
    weight=O.PerChannelMinMaxObserver.with_args(dtype=torch.int8, qscheme=torch.per_channel_symmetric))


def _qparams(reference: nn.Module) -> dict:
    """Every activation and weight scale / zero point buffer of a reference model, as lists."""
    return {name: buf.tolist() for name, buf in reference.named_buffers()
            if name.endswith(("scale", "zero_point"))}


def _calibrated(mapping, batches, ddp: bool = False):
    prepared = prepare_fx(_net().eval(), mapping, EXAMPLE)
    runner = nn.parallel.DistributedDataParallel(prepared, broadcast_buffers=False) if ddp else prepared
    with torch.no_grad():
        for x in batches:
            runner(x)
    return prepared


def _convert(prepared) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsyncedObserversWarning)  # synced: no warning
        return convert_to_reference_fx(copy.deepcopy(prepared))


def _scenario_minmax(rank: int, out: dict) -> None:
    mapping = fxquant.QConfigMapping().set_global(MINMAX)
    prepared = _calibrated(mapping, [_batch(rank, b) for b in range(BATCHES)], ddp=True)
    assert sync_observers(prepared) > 0 and observers_in_sync(prepared)
    reference = _convert(prepared)
    single = convert_to_reference_fx(_calibrated(mapping, _union()))
    assert _qparams(reference) == _qparams(single)  # exact
    assert torch.equal(reference(PROBE), single(PROBE))
    out["minmax"] = {"qparams": _qparams(reference), "output": reference(PROBE).tolist()}


def _scenario_histogram(rank: int, out: dict) -> None:
    mapping = fxquant.get_default_qconfig_mapping("x86")
    prepared = _calibrated(mapping, [])
    with ObserverSync(prepared), torch.no_grad():
        for b in range(BATCHES):
            prepared(_batch(rank, b))
    reference = _convert(prepared)
    ours, single = _qparams(reference), _qparams(convert_to_reference_fx(_calibrated(mapping, _union())))
    assert ours.keys() == single.keys()
    worst = 0.0
    for name, value in ours.items():
        if "weight" in name:
            assert value == single[name], name  # weights: exact
        elif name.endswith("scale"):
            worst = max(worst, abs(value[0] / single[name][0] - 1) if isinstance(value, list) else
                        abs(value / single[name] - 1))
    assert worst <= HIST_SCALE_TOLERANCE, worst
    out["histogram"] = {"qparams": ours, "output": reference(PROBE).tolist(), "worst": worst}


def _scenario_qat_ddp(rank: int, out: dict) -> None:
    prepared = prepare_qat_fx(_net().train(), fxquant.get_default_qat_qconfig_mapping("x86"), EXAMPLE)
    ddp = nn.parallel.DistributedDataParallel(prepared, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    syncer = ObserverSync(prepared, every_n_steps=2)
    for b in range(BATCHES):  # syncs after step 2
        loss = ddp(_batch(rank, b)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        syncer.step()
    assert not observers_in_sync(prepared)  # step 3 observed different shards
    syncer.sync()
    assert observers_in_sync(prepared)
    reference = _convert(prepared.eval())
    bn = prepared.conv1.bn
    out["qat"] = {"qparams": _qparams(reference), "output": reference(PROBE).tolist(),
                  "bn": [bn.running_mean.tolist(), bn.running_var.tolist()]}


def _scenario_errors(rank: int, out: dict) -> None:
    other = prepare_fx(_net(extra_relu=rank == 1).eval(), fxquant.QConfigMapping().set_global(MINMAX), EXAMPLE)
    with pytest.raises(ObserverSyncError, match="disagree on the prepared graph"):
        sync_observers(other)
    prepared = _calibrated(fxquant.QConfigMapping().set_global(MINMAX), [_batch(rank, 0)])
    if rank == 0:  # converting on one rank alone must not hang (no collective), and warns: never synced
        with pytest.warns(UnsyncedObserversWarning, match="rank 0 of 2.*sync_observers"):
            convert_to_reference_fx(copy.deepcopy(prepared))
    sync_observers(prepared)
    with torch.no_grad():
        prepared(_batch(rank, 1) * 10)  # statistics change after the sync
    with pytest.warns(UnsyncedObserversWarning, match="changed since the last"):
        convert_to_reference_fx(copy.deepcopy(prepared))
    out["errors"] = "checked"


SCENARIOS = [_scenario_minmax, _scenario_histogram, _scenario_qat_ddp, _scenario_errors]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out: dict = {}
        for scenario in SCENARIOS:
            scenario(rank, out)
            dist.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(_worker, str(tmp_path_factory.mktemp("dist_pipeline")), WORLD, TIMEOUT_S)


@pytest.mark.parametrize("scenario", ["minmax", "histogram", "qat"])
def test_every_rank_converts_to_identical_qparams_and_outputs(results, scenario):
    assert results[0][scenario]["qparams"] and results[0][scenario] == results[1][scenario]


def test_qat_batch_norm_statistics_are_synced_too(results):
    assert results[0]["qat"]["bn"] == results[1]["qat"]["bn"]


def test_errors_checked_on_every_rank(results):
    assert all(r["errors"] == "checked" for r in results)
    assert all(r["histogram"]["worst"] <= HIST_SCALE_TOLERANCE for r in results)


def test_without_a_process_group():
    assert not dist.is_initialized()
    prepared = prepare_fx(_net().eval(), fxquant.QConfigMapping().set_global(MINMAX), EXAMPLE)
    with pytest.raises(ObserverSyncError, match="init_process_group"):
        sync_observers(prepared)
    with pytest.raises(ObserverSyncError, match="init_process_group"):
        observers_in_sync(prepared)
    prepared(EXAMPLE[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsyncedObserversWarning)  # single process: convert never warns
        convert_to_reference_fx(prepared)
