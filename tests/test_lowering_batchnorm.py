"""Eval-mode batch norms between quantized values (DenseNet's BN -> ReLU -> conv, a BN on the input) lower to one
QuantizedBatchNorm on the integer tensors: within one output step of the reference model with each kernel
(native one pass, onednn 1x1 depthwise conv, float addcmul; the native pass equal to the float one bit for bit in
every layout), and the module survives save / load, state dicts, deepcopy, export."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.kernels import native, x86
from fxquant.nn import quantized as Q


class _PreActivation(nn.Module):
    """DenseNet's dense layer (BN -> ReLU -> 1x1 conv, concatenated to its input), then a plain BN and a head."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.norm, self.relu, self.conv = nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, 16, 1)
        self.norm2 = nn.BatchNorm2d(channels + 16)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(channels + 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.cat([y, self.conv(self.relu(self.norm(y)))], 1)
        return self.fc(self.pool(self.norm2(y)).flatten(1))


class _InputNorm(nn.Module):
    """A BatchNorm3d + ReLU on the quantized input volume (nothing to fold it into), then a conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.relu, self.conv = nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.relu(self.norm(x)))


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)  # negative scales too
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def _convert(model: nn.Module, example: tuple) -> tuple[nn.Module, nn.Module, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for k in range(3):
                prepared(*(t * (1 + 0.2 * k) for t in example))
        return prepared, fxquant.convert_to_reference_fx(copy.deepcopy(prepared)), fxquant.convert_fx(
            copy.deepcopy(prepared))


def _norm_modules(model: nn.Module) -> list[Q.QuantizedBatchNorm]:
    return [m for m in model.modules() if isinstance(m, Q.QuantizedBatchNorm)]


def _steps(ref: nn.Module, low: nn.Module, inputs: tuple) -> float:
    scale = [float(m.scale) for m in low.modules() if isinstance(m, Q.DeQuantize)][-1]
    with torch.no_grad():
        return float(((ref(*inputs) - low(*inputs)).abs() / scale).max()) - 1e-3


@pytest.mark.parametrize("kernel", ["native", "onednn_depthwise", "float"])
@pytest.mark.parametrize("size", [8, 64])
def test_pre_activation_block_matches_the_reference(kernel, size, monkeypatch):
    if kernel == "onednn_depthwise" and not x86.onednn_available():
        pytest.skip("onednn int8 ops are not in this torch build")
    if kernel == "native" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    monkeypatch.setitem(x86.RULES, "batch_norm", (x86.Rule(kernel),))
    torch.manual_seed(0)
    example = (torch.randn(2, 3, size, size),)
    _, ref, low = _convert(_randomize(_PreActivation()), example)
    norms = _norm_modules(low)
    assert len(norms) == 2 and [m.relu for m in norms] == [True, False]
    rows = {r.node: r for r in fxquant.lowering_report(low)}
    assert rows["norm"].rule == rows["norm2"].rule == "batch_norm" and rows["norm"].kernel == "QuantizedBatchNorm"
    assert not any(type(m).__name__ in ("BatchNorm2d", "BNReLU2d") for m in low.modules())
    for inputs in (example, (example[0] * 3 + 0.5,)):  # within and beyond the calibration range
        assert _steps(ref, low, inputs) <= 1.0
        assert all(m._kernel_cache.get(("kernel", 4, n)) == kernel for m in norms for n in
                   [k[2] for k in m._kernel_cache if isinstance(k, tuple) and k[0] == "kernel"])


def _layouts(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` contiguous, channels-last (4-d / 5-d) and as a strided view no dense layout describes."""
    out = [x.contiguous()]
    if x.dim() == 4:
        out.append(x.contiguous(memory_format=torch.channels_last))
    if x.dim() == 5:
        out.append(x.contiguous(memory_format=torch.channels_last_3d))
    out.append(torch.stack([x, x], dim=-1)[..., 0])
    return out


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("shape", [(2, 5), (3, 7, 11), (2, 24, 9, 13), (1, 3, 1, 1), (2, 6, 3, 4, 5)])
@pytest.mark.parametrize("relu", [False, True])
def test_native_pass_equals_the_float_kernel_bit_for_bit(shape, relu, monkeypatch):
    gen = torch.Generator().manual_seed(len(shape))
    channels = shape[1]
    norm = Q.QuantizedBatchNorm(torch.randn(channels, generator=gen), torch.randn(channels, generator=gen) * 3,
                                (0.05, 7), (0.04, 100), relu=relu, quant_min=0, quant_max=200)
    q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    extremes = torch.tensor([0, 255, 128, 127], dtype=torch.uint8)[:q.numel()]
    q.view(-1)[:len(extremes)] = extremes
    monkeypatch.setitem(x86.RULES, "batch_norm", (x86.Rule("float"),))
    expected = norm(q)
    a, b, lo = norm._scalars()
    for x in _layouts(q):
        got = native.channel_affine(x, a, b, lo, norm.quant_max)
        assert got.dtype == torch.uint8 and torch.equal(got, expected), x.stride()
        if x.dim() in (4, 5) and not x.is_contiguous() and got.dim() == x.dim():
            assert got.stride() == x.stride() or x.stride() != x.contiguous(
                memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d).stride()
    assert int(expected.min()) >= (100 if relu else 0) and int(expected.max()) <= 200
    norm._kernel_cache.clear()
    monkeypatch.setitem(x86.RULES, "batch_norm", (x86.Rule("native"),))
    assert torch.equal(norm(q), expected) and norm._kernel(q) == "native"


def test_batch_norm_3d_relu_on_the_input():
    torch.manual_seed(0)
    example = (torch.randn(2, 4, 6, 6, 6),)
    _, ref, low = _convert(_randomize(_InputNorm()), example)
    assert [m.relu for m in _norm_modules(low)] == [True]
    for inputs in (example, (example[0] * 3 + 0.5,)):
        assert _steps(ref, low, inputs) <= 1.0


def test_training_mode_norm_is_not_lowered():
    torch.manual_seed(0)
    model = _randomize(_InputNorm())
    example = (torch.randn(2, 4, 6, 6, 6),)
    prepared, _, _ = _convert(model, example)
    prepared.norm.train()
    low = fxquant.convert_fx(prepared)
    assert not _norm_modules(low)
    row = next(r for r in fxquant.lowering_report(low) if r.node == "norm")
    assert row.rule == "reference" and "training" in row.reason


def test_module_persistence(tmp_path):
    torch.manual_seed(0)
    example = (torch.randn(2, 3, 16, 16),)
    prepared, _, low = _convert(_randomize(_PreActivation()), example)
    with torch.no_grad():
        expected = low(*example)
    path = tmp_path / "m.pt"
    torch.save(low, path)
    with torch.no_grad():
        assert torch.equal(torch.load(path, weights_only=False)(*example), expected)
        assert torch.equal(copy.deepcopy(low)(*example), expected)
    buffer = io.BytesIO()
    torch.save(low.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = fxquant.convert_fx(copy.deepcopy(prepared))
    for m in _norm_modules(fresh):  # different values to load over
        m.channel_scale.mul_(2)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(*example), expected)
    exported = torch.export.export(low, example)
    with torch.no_grad():
        got = exported.module()(*example)
    scale = [float(m.scale) for m in low.modules() if isinstance(m, Q.DeQuantize)][-1]
    assert float(((got - expected).abs() / scale).max()) <= 1.0 + 1e-3


def test_bad_channel_count_names_the_module():
    bn = _randomize(nn.BatchNorm2d(4))
    m = Q.QuantizedBatchNorm.from_batch_norm(bn, (0.1, 0), (0.1, 0))
    with pytest.raises(ValueError, match="QuantizedBatchNorm: expected 4 channels"):
        m(torch.zeros(1, 5, 2, 2, dtype=torch.uint8))
