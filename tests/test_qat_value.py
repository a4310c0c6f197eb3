"""A test of value (issue 5): 4-bit weights (range -8..7, per-channel symmetric) on scikit-learn's bundled digits.

Quantization-aware training recovers the accuracy that post-training quantization at 4 bits loses. Everything is
deterministic (fixed seeds, one thread); accuracy is that of the converted reference models, i.e. what ships.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import fake_quantize as FQ
from fxquant import observer as O
from fxquant.quantize_fx import convert_to_reference_fx, prepare_fx, prepare_qat_fx


W4 = dict(quant_min=-8, quant_max=7, dtype=torch.int8, qscheme=torch.per_channel_symmetric, ch_axis=0)
ACT8 = dict(quant_min=0, quant_max=255, dtype=torch.uint8)


def _digits():
    """Digits with features in different units (scales log-uniform over 3 decades, as unnormalised tabular data
    has): one row of a first-layer weight then spans a wide range, which 16 levels per channel cannot hold."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = x * 10 ** (torch.rand(64, generator=torch.Generator().manual_seed(5)) * 3 - 1.5)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return (x[order[:1200]], y[order[:1200]]), (x[order[1200:]], y[order[1200:]])


def _fit(model, train, epochs, lr, seed):
    (x, y), gen = train, torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def _accuracy(model, test):
    with torch.no_grad():
        return (model.eval()(test[0]).argmax(1) == test[1]).float().mean().item()


def _ptq_and_qat(seed, train, test):
    torch.manual_seed(seed)
    float_model = _fit(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), train, 20, 1e-2, seed)
    example = (train[0][:4],)
    ptq_qconfig = fxquant.QConfig(activation=O.MinMaxObserver.with_args(**ACT8),
                                  weight=O.PerChannelMinMaxObserver.with_args(**W4))
    observed = prepare_fx(copy.deepcopy(float_model).eval(),
                          fxquant.QConfigMapping().set_global(ptq_qconfig), example)
    with torch.no_grad():
        observed(train[0])
    qat_qconfig = fxquant.QConfig(
        activation=FQ.FakeQuantize.with_args(observer=O.MovingAverageMinMaxObserver, **ACT8),
        weight=FQ.FakeQuantize.with_args(observer=O.MovingAveragePerChannelMinMaxObserver, **W4))
    qat = prepare_qat_fx(copy.deepcopy(float_model).train(), fxquant.QConfigMapping().set_global(qat_qconfig),
                         example)
    _fit(qat, train, 6, 1e-3, seed + 100).apply(fxquant.disable_observer)
    return [_accuracy(m, test) for m in (float_model, convert_to_reference_fx(observed),
                                         convert_to_reference_fx(qat))]


def test_qat_recovers_the_accuracy_4bit_ptq_loses():
    """Measured (float / PTQ-4 / QAT-4 accuracy of the converted reference models, 597 test digits): over seeds
    0-7, float 0.93-0.95, PTQ 0.81-0.87, QAT 0.87-0.93, QAT - PTQ +2 to +10 points (mean +7); seeds 0-2 here:
    mean gap +7.3 points, PTQ loses 10.6."""
    train, test = _digits()
    runs = [_ptq_and_qat(seed, train, test) for seed in range(3)]
    mean = [sum(r[i] for r in runs) / len(runs) for i in range(3)]
    float_acc, ptq_acc, qat_acc = mean
    assert float_acc > 0.9, runs  # the float model learned the task
    assert float_acc - ptq_acc > 0.05, runs  # 4-bit PTQ clearly loses accuracy
    assert qat_acc - ptq_acc > 0.04, runs  # QAT wins it back ...
    assert qat_acc - ptq_acc > 0.4 * (float_acc - ptq_acc), runs  # ... a good part of what PTQ lost
    assert all(qat > ptq for _, ptq, qat in runs), runs
