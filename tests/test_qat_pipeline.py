"""prepare_qat_fx -> train -> convert, end to end (issue 5).

* Differential against torch.ao's prepare_qat_fx on the model zoo: the same modules and node counts, under
  ``default_qat_qconfig`` (version 0: FakeQuantize with moving-average observers) and the x86 default QAT mapping;
  for version 0 also the same output at step 0, after SGD steps and after convert, bit for bit.
* The x86 default QAT qconfig (FusedMovingAvgObsFakeQuantize) trains differently from torch.ao ON PURPOSE:
  torch.ao's fused kernel trains with qparams its own convert does not use (symmetric weights
  ``max(|min| / 128, max / 127)`` instead of ``max(|min|, max) / 127.5``; a zero range gives 0.1 instead of eps).
  fxquant trains with ``calculate_qparams()`` at every step, so convert stores exactly the scales training used
  (tested bit for bit below; torch.ao's mismatch is shown too).
* The test of value (4-bit weights on scikit-learn's digits) is in test_qat_value.py.
"""
from __future__ import annotations

import copy
import io
import operator
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
import oracle
from fxquant import fake_quantize as FQ
from fxquant import observer as O
from fxquant.nn import qat as nnqat
from fxquant.nn.intrinsic import qat as nniqat
from fxquant.quantize_fx import convert_fx, convert_to_reference_fx, prepare_qat_fx
from models import MODELS


# QConfigMappings built from a namespace (fxquant or torch.ao.quantization)
def v0_mapping(ns):
    return ns.QConfigMapping().set_global(ns.default_qat_qconfig)


def x86_mapping(ns):
    return ns.get_default_qat_qconfig_mapping("x86")


def with_embedding_qat(base):
    return lambda ns: base(ns).set_object_type(nn.Embedding, ns.default_embedding_qat_qconfig)


MAPPINGS = {"v0": v0_mapping, "x86": x86_mapping}


def _prepare(lib_fx, ns, model, example_inputs, mapping):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib_fx.prepare_qat_fx(copy.deepcopy(model).train(), mapping(ns), example_inputs)


def _run(model, inputs, seed=0):
    torch.manual_seed(seed)  # dropout in train mode
    return model(*inputs)


def _structure(gm):
    """Module path -> kind, activation observers left out (their numbering differs; node counts cover them)."""
    return {name: oracle.module_key(m) for name, m in gm.named_modules() if "activation_post_process" not in name}


def _pair(model_name, mapping):
    import torch.ao.quantization.quantize_fx as ao_fx

    torchao = oracle.require_torchao()
    model, inputs = MODELS[model_name].factory()
    if model_name == "bert_encoder":
        mapping = with_embedding_qat(mapping)
    return (_prepare(fxquant.quantize_fx, fxquant, model, inputs, mapping),
            _prepare(ao_fx, torchao, model, inputs, mapping), inputs)


# ---------------------------------------------------------------------------------------------------------------
# differential against torch.ao
# ---------------------------------------------------------------------------------------------------------------

DIFFERENTIAL = [(name, "v0") for name in ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet",
                                           "bert_encoder", "functional")] + \
               [(name, "x86") for name in ("resnet18", "mobilenet_v3_small", "bert_encoder")]


@pytest.mark.torchao
@pytest.mark.parametrize("model_name,mapping_name", DIFFERENTIAL)
def test_structure_and_step_zero_like_torchao(model_name, mapping_name):
    ours, theirs, inputs = _pair(model_name, MAPPINGS[mapping_name])
    assert oracle.node_count_dict(ours, observers_by_class=True) == \
        oracle.node_count_dict(theirs, observers_by_class=True)
    assert _structure(ours) == _structure(theirs)
    if mapping_name == "v0":  # x86: outputs differ on purpose (module docstring)
        oracle.assert_bit_identical(_run(ours, inputs), _run(theirs, inputs), f"{model_name} step 0")


def _sgd_steps(model, batches, steps=3, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step, batch in enumerate(batches[:steps]):
        loss = _run(model, batch, seed=step).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.torchao
@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v3_small"])
def test_sgd_steps_and_convert_like_torchao(model_name):
    import torch.ao.quantization as ao
    import torch.ao.quantization.quantize_fx as ao_fx

    ours, theirs, inputs = _pair(model_name, v0_mapping)
    batches = MODELS[model_name].calibration_data(3)
    _sgd_steps(ours, batches)
    _sgd_steps(theirs, batches)
    oracle.assert_bit_identical(dict(ours.named_parameters()), dict(theirs.named_parameters()), "parameters")
    oracle.assert_bit_identical(_run(ours, inputs), _run(theirs, inputs), "output after SGD")
    # torch.ao's convert runs the weight fake quants once more (on the folded weights); with observers frozen
    # that is a no-op and both libraries convert to the same model
    ours.apply(fxquant.disable_observer)
    theirs.apply(ao.disable_observer)
    ref_ours, ref_theirs = convert_to_reference_fx(ours.eval()), ao_fx.convert_to_reference_fx(theirs.eval())
    oracle.assert_qparams_equal(oracle.collect_qparams(ref_ours), oracle.collect_qparams(ref_theirs))
    oracle.assert_qparams_equal(oracle.collect_weight_qparams(ref_ours), oracle.collect_weight_qparams(ref_theirs))
    oracle.assert_bit_identical(ref_ours(*inputs), ref_theirs(*inputs), "reference output")


@pytest.mark.torchao
def test_untrained_qat_model_converts_like_torchao():
    """No training step at all: the weight fake quants never ran; convert observes the folded weights (torch.ao
    does the same) instead of storing scale 1.0."""
    import torch.ao.quantization.quantize_fx as ao_fx

    ours, theirs, inputs = _pair("resnet18", v0_mapping)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # activations saw no data either
        ref_ours, ref_theirs = convert_to_reference_fx(ours.eval()), ao_fx.convert_to_reference_fx(theirs.eval())
    weights = oracle.collect_weight_qparams(ref_ours)
    assert weights and all(not torch.all(q.scale == 1.0) for q in weights)
    oracle.assert_qparams_equal(weights, oracle.collect_weight_qparams(ref_theirs))
    oracle.assert_bit_identical(ref_ours(*inputs), ref_theirs(*inputs))


@pytest.mark.torchao
def test_torchao_fused_fake_quant_trains_with_other_scales_than_it_converts(torchao):
    """The x86 default QAT qconfig: torch.ao's weight scale during training differs from the one it converts to;
    fxquant's is the same (next tests)."""
    fq = torchao.default_fused_per_channel_wt_fake_quant()
    fq(torch.randn(8, 16))
    assert not torch.equal(fq.scale, fq.calculate_qparams()[0])
    ours = FQ.default_fused_per_channel_wt_fake_quant()
    ours(torch.randn(8, 16))
    assert torch.equal(ours.scale, ours.calculate_qparams()[0])


def test_embeddings_under_the_global_qat_qconfig():
    """torch.ao fails (assertion deep in prepare); fxquant leaves the embedding float, as prepare_fx does, with
    the reason in fxquant.explain; a qconfig the QAT class rejects names the module."""
    model, inputs = MODELS["bert_encoder"].factory()
    prepared = _prepare(fxquant.quantize_fx, fxquant, model, inputs, x86_mapping)
    assert type(prepared.word_embeddings) is nn.Embedding
    row = next(r for r in fxquant.explain(prepared) if r.node == "word_embeddings")
    assert not row.quantized and "does not support this qconfig" in row.reason
    _sgd_steps(prepared, MODELS["bert_encoder"].calibration_data(2), steps=2)
    converted = convert_to_reference_fx(prepared.eval())
    assert type(converted.word_embeddings) is nn.Embedding and torch.isfinite(converted(*inputs)).all()

    good = _prepare(fxquant.quantize_fx, fxquant, model, inputs, with_embedding_qat(x86_mapping))
    assert isinstance(good.word_embeddings, nnqat.Embedding)
    wrong = fxquant.QConfig(activation=O.NoopObserver.with_args(dtype=torch.float32),
                            weight=FQ.default_weight_fake_quant)  # per-tensor: embeddings need float qparams
    mapping = fxquant.get_default_qat_qconfig_mapping("x86").set_object_type(nn.Embedding, wrong)
    with pytest.raises(nnqat.QATConfigError, match=r"word_embeddings.*per_channel_affine_float_qparams"):
        prepare_qat_fx(copy.deepcopy(model).train(), mapping, inputs)


# ---------------------------------------------------------------------------------------------------------------
# schedules, train / eval, convert, serialization (a small ConvBn net: fast)
# ---------------------------------------------------------------------------------------------------------------

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=gen),) for _ in range(4)]


def _tiny(mapping=x86_mapping, steps=3):
    torch.manual_seed(0)
    batches = _batches()
    prepared = prepare_qat_fx(TinyNet().train(), mapping(fxquant), batches[0])
    _sgd_steps(prepared, batches, steps)
    return prepared, batches


def _fake_quants(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FQ.FakeQuantizeBase)}


def test_freeze_bn_stats_and_observer_schedules_through_apply():
    prepared, batches = _tiny()
    bn = prepared.conv1.bn
    prepared.apply(nniqat.freeze_bn_stats)
    frozen_mean = bn.running_mean.clone()
    _sgd_steps(prepared, batches[1:], 1)
    assert torch.equal(bn.running_mean, frozen_mean)
    prepared.apply(nniqat.update_bn_stats)
    _sgd_steps(prepared, batches[2:], 1)
    assert not torch.equal(bn.running_mean, frozen_mean)

    prepared.apply(fxquant.disable_observer)
    scales = {n: fq.scale.clone() for n, fq in _fake_quants(prepared).items()}
    _sgd_steps(prepared, batches[3:], 1)
    assert all(torch.equal(fq.scale, scales[n]) for n, fq in _fake_quants(prepared).items())
    quantized = _run(prepared.eval(), batches[0])
    prepared.apply(fxquant.disable_fake_quant)
    assert not torch.equal(_run(prepared, batches[0]), quantized)
    prepared.apply(fxquant.enable_fake_quant)
    prepared.apply(fxquant.enable_observer)
    _sgd_steps(prepared.train(), batches[1:], 1)
    assert any(not torch.equal(fq.scale, scales[n]) for n, fq in _fake_quants(prepared).items())


def test_without_fake_quant_the_qat_model_computes_the_float_model():
    torch.manual_seed(0)
    model = TinyNet().train()
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_qat_fx(copy.deepcopy(model), x86_mapping(fxquant), (x,))
    prepared.apply(fxquant.disable_fake_quant)
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)  # train mode: batch statistics
    torch.testing.assert_close(prepared.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)  # running statistics


def test_train_eval_switching():
    prepared, batches = _tiny()
    prepared.eval()
    assert not any(m.training for m in prepared.modules())
    stats = prepared.conv2.bn.running_var.clone()
    prepared(*batches[1])
    assert torch.equal(prepared.conv2.bn.running_var, stats)
    prepared.apply(fxquant.disable_observer)  # observers still run in eval mode (as torch.ao's)
    assert torch.equal(prepared(*batches[1]), prepared(*batches[1]))
    prepared.train()
    assert all(m.training for m in prepared.modules())
    prepared(*batches[2])
    assert not torch.equal(prepared.conv2.bn.running_var, stats)


@pytest.mark.parametrize("mapping_name", sorted(MAPPINGS))
def test_convert_stores_the_scales_training_used(mapping_name):
    prepared, batches = _tiny(MAPPINGS[mapping_name])
    trained = {n: (fq.scale.clone(), fq.zero_point.clone()) for n, fq in _fake_quants(prepared).items()}
    for name, (scale, zero_point) in trained.items():  # what forward used == what convert will use
        new_scale, new_zp = _fake_quants(prepared)[name].calculate_qparams()
        assert torch.equal(scale, new_scale) and torch.equal(zero_point.long(), new_zp.long()), name
    activations = oracle.collect_qparams(prepared)
    reference = convert_to_reference_fx(copy.deepcopy(prepared).eval())
    oracle.assert_qparams_equal(oracle.collect_qparams(reference), activations)
    for path in ("conv1", "conv2", "fc"):
        ref_module = reference.get_submodule(path)
        ref_module = ref_module[0] if isinstance(ref_module, nn.Sequential) else ref_module
        scale, zero_point = trained[f"{path}.weight_fake_quant"]
        assert torch.equal(ref_module.weight_scale, scale), path
        assert torch.equal(ref_module.weight_zero_point, zero_point.long()), path
    lowered = convert_fx(copy.deepcopy(prepared).eval())
    assert not _fake_quants(lowered) and not any("qat" in type(m).__module__ for m in lowered.modules())
    assert torch.isfinite(lowered(*batches[0])).all()


def test_learned_scales_are_what_convert_stores():
    weight = FQ.LearnableFakeQuantize.with_args(observer=O.MovingAverageMinMaxObserver, quant_min=-128,
                                                quant_max=127, dtype=torch.int8, qscheme=torch.per_tensor_symmetric,
                                                use_grad_scaling=True)
    qconfig = fxquant.QConfig(activation=FQ.default_fake_quant, weight=weight)
    prepared, batches = _tiny(lambda ns: ns.QConfigMapping().set_global(qconfig), steps=0)
    with torch.no_grad():
        prepared(*batches[0])  # static estimate: scales from the observers
    for fq in _fake_quants(prepared).values():
        if isinstance(fq, FQ.LearnableFakeQuantize):
            fq.enable_param_learning()
    initial = prepared.fc.weight_fake_quant.scale.detach().clone()
    _sgd_steps(prepared, batches[1:], 2, lr=1e-3)
    learned = prepared.fc.weight_fake_quant.scale.detach().clone()
    assert not torch.equal(learned, initial) and bool((learned > 0).all())  # the scale was learned
    reference = convert_to_reference_fx(prepared.eval())
    assert torch.equal(reference.fc.weight_scale.reshape(-1), learned.reshape(-1))


def test_shared_fake_quant_called_twice_before_backward():
    """Gradient accumulation / one fake quant used at two places: in-place qparam refreshes must not break
    backward (torch.ao's kernel saves only a mask)."""
    fq = FQ.default_fake_quant()
    x = torch.randn(16, requires_grad=True)
    (fq(x) + fq(x * 3)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_qat_model_deepcopies_pickles_and_saves(tmp_path):
    prepared, batches = _tiny()
    prepared.eval().apply(fxquant.disable_observer)
    expected = prepared(*batches[0])
    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared))):
        assert torch.equal(clone(*batches[0]), expected)
        _sgd_steps(clone.train(), batches, 1)  # still trains
        assert convert_to_reference_fx(clone.eval())(*batches[0]).shape == expected.shape
    reference = convert_to_reference_fx(pickle.loads(pickle.dumps(prepared)))(*batches[0])
    assert torch.equal(reference, convert_to_reference_fx(copy.deepcopy(prepared))(*batches[0]))
    buffer = io.BytesIO()
    torch.save(prepared.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = _tiny(steps=0)  # per-tensor scales before any step: the loaded per-channel ones must fit
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.eval()(*batches[0]), expected)


def test_convert_time_none_turns_a_qat_module_back_to_float():
    prepared, batches = _tiny()
    mapping = x86_mapping(fxquant).set_module_name("fc", None)
    converted = convert_to_reference_fx(prepared.eval(), qconfig_mapping=mapping)
    assert type(converted.fc) is nn.Linear


class _ShiftedScale(nn.Module):  # Gemma's RMSNorm: x_normed * (1.0 + weight), weight initialised to zeros
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.weight = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return self.fc(x) * (1.0 + self.weight)


def test_scalar_op_gets_its_own_moving_average_fake_quant_and_keeps_its_range():
    """``1.0 + w`` shares w's observer in torch.ao's tables; a moving-average fake quant called on both w (zeros)
    and 1.0 + w (ones) settles on a blend near 0 and clamps the ones: the product came out ~0 (0.3 dB on Gemma)."""
    torch.manual_seed(0)
    model = _ShiftedScale().train()
    x = torch.randn(16, 8)
    prepared = prepare_qat_fx(copy.deepcopy(model), x86_mapping(fxquant), (x,))
    fakes = {n.name: prepared.get_submodule(str(n.target)) for n in prepared.graph.nodes
             if n.op == "call_module" and isinstance(prepared.get_submodule(str(n.target)), FQ.FakeQuantizeBase)}
    add = next(n for n in prepared.graph.nodes if n.op == "call_function" and n.target in (torch.add, operator.add))
    w_fq = prepared.get_submodule(str(add.args[1].target))
    add_fq = prepared.get_submodule(str(next(iter(add.users)).target))
    assert w_fq is not add_fq and len(set(map(id, fakes.values()))) == len(fakes)
    for _ in range(20):
        prepared(x)
    prepared.eval()
    with torch.no_grad():
        expected = model.eval()(x)
        assert _sqnr(expected, prepared(x)) > 25
        assert _sqnr(expected, convert_fx(copy.deepcopy(prepared))(x)) > 25


def test_post_training_scalar_op_still_shares_torch_ao_s_union_observer():
    model = _ShiftedScale().eval()
    x = torch.randn(16, 8)
    prepared = fxquant.prepare_fx(copy.deepcopy(model), fxquant.get_default_qconfig_mapping("x86"), (x,))
    add = next(n for n in prepared.graph.nodes if n.op == "call_function" and n.target in (torch.add, operator.add))
    assert prepared.get_submodule(str(add.args[1].target)) is prepared.get_submodule(str(next(iter(add.users)).target))


def _sqnr(ref, out):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-20)))
