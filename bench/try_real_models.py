"""Try fxquant on real architectures "traced as they come": torchvision and Hugging Face models, random init, offline.

    /work/tvenv/bin/python bench/try_real_models.py                    # every model (a few minutes on 2 cores)
    /work/tvenv/bin/python bench/try_real_models.py --only resnet18 bert
    /work/tvenv/bin/python bench/try_real_models.py --skip-hf --size 64 -v   # -v: full tracebacks of failures
    /work/tvenv/bin/python bench/try_real_models.py --size 224 --latency 15   # + batch-1 latency vs fp32 / torch.ao
    /work/tvenv/bin/python bench/try_real_models.py --even-more              # 99 models (~15 minutes)

Runs in a throwaway environment with torchvision / transformers installed (never used by the tests or CI). For each
model: prepare_fx (x86 default mapping) -> calibrate on 2 batches -> convert_to_reference_fx -> convert_fx, then prints
one table row: the first stage that failed with its exception, or ok with the reference (and lowered) model's output
SQNR vs the float model, and the time per stage. "ok (traced on inputs)": plain torch.fx failed and prepare_fx traced
the model on its example inputs instead (fxquant.tracing; Hugging Face models). Where a Hugging Face model fails, a
second row passes either a GraphModule made by ``transformers.utils.fx.symbolic_trace`` (``<name>+hf_trace``,
transformers < 5) or a wrapper module whose forward names its input (``<name>+wrapped``).

Where this torch still has torch.ao, the same recipe through torch.ao gives an oracle SQNR column: random-init nets are
chaotic, tens of dB is not to be expected everywhere. Batch norms first get running statistics from two train-mode
passes, and all-zero heads random weights, so that outputs are not ~0.

Each regression found here is reproduced without torchvision / transformers in tests/test_real_constructs.py.
"""
from __future__ import annotations

import argparse
import copy
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

import fxquant as tq

Factory = Callable[[int], tuple[nn.Module, Callable[[int], tuple]]]


# ---------------------------------------------------------------------------------------------------------------- models
def _tv(name: str, min_size: int = 0, **kwargs: Any) -> Factory:
    def make(size: int) -> tuple[nn.Module, Callable[[int], tuple]]:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **kwargs)
        side = max(size, min_size)
        return model, lambda seed: (torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed)),)

    return make


def _tv_kw(name: str, size_kw: str, min_size: int = 0, **kwargs: Any) -> Factory:
    """Models that take their input size as a constructor argument (ViT, MaxViT)."""

    def make(size: int) -> tuple[nn.Module, Callable[[int], tuple]]:
        side = max(size, min_size)
        return _tv(name, **kwargs, **{size_kw: side if size_kw == "image_size" else (side, side)})(side)

    return make


def _fpn_backbone(arch: str) -> Factory:
    def make(size: int) -> tuple[nn.Module, Callable[[int], tuple]]:
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        model = resnet_fpn_backbone(backbone_name=arch, weights=None, trainable_layers=5)
        return model, lambda seed: (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)),)

    return make


TORCHVISION: dict[str, Factory] = {
    "resnet18": _tv("resnet18"),
    "resnet50": _tv("resnet50"),
    "resnext50_32x4d": _tv("resnext50_32x4d"),
    "wide_resnet50_2": _tv("wide_resnet50_2"),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "mnasnet0_5": _tv("mnasnet0_5"),
    "shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "squeezenet1_1": _tv("squeezenet1_1"),
    "googlenet": _tv("googlenet", aux_logits=False, init_weights=False),
    "inception_v3": _tv("inception_v3", min_size=96, aux_logits=False, init_weights=False),
    "densenet121": _tv("densenet121"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "efficientnet_v2_s": _tv("efficientnet_v2_s"),
    "regnet_y_400mf": _tv("regnet_y_400mf"),
    "regnet_x_400mf": _tv("regnet_x_400mf"),
    "convnext_tiny": _tv("convnext_tiny"),
    "vit_b_16": _tv_kw("vit_b_16", "image_size", min_size=64),
    "swin_t": _tv("swin_t"),
    "swin_v2_t": _tv("swin_v2_t"),
    "maxvit_t": _tv_kw("maxvit_t", "input_size", min_size=224),
    "fcn_resnet50": _tv("fcn_resnet50", aux_loss=False, weights_backbone=None),
    "deeplabv3_mobilenet_v3_large": _tv("deeplabv3_mobilenet_v3_large", aux_loss=False, weights_backbone=None),
    "lraspp_mobilenet_v3_large": _tv("lraspp_mobilenet_v3_large", weights_backbone=None),
    "fpn_resnet18_backbone": _fpn_backbone("resnet18"),
}


def _tvq(name: str, **kwargs: Any) -> Factory:
    """torchvision's quantizable variants (QuantStub / DeQuantStub / FloatFunctional adds, as eager-mode users
    wrote their models), in float (``quantize=False``)."""
    def make(size: int) -> tuple[nn.Module, Callable[[int], tuple]]:
        import torchvision.models.quantization as tvq

        model = getattr(tvq, name)(weights=None, quantize=False, **kwargs)
        side = max(size, 96)
        return model, lambda seed: (torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed)),)

    return make


def _tv_video(name: str, frames: int = 8, side: int = 64) -> Factory:
    """torchvision's video classifiers (Conv3d / BatchNorm3d / 3-d pools) on ``frames`` frames."""
    def make(size: int) -> tuple[nn.Module, Callable[[int], tuple]]:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        return model, lambda seed: (torch.randn(1, 3, frames, side, side,
                                                generator=torch.Generator().manual_seed(seed)),)

    return make


# architectures a migrating user is likely to bring beyond the common classifiers (run by default, or --only)
TORCHVISION_MORE: dict[str, Factory] = {
    "q_resnet18": _tvq("resnet18"),
    "q_resnet50": _tvq("resnet50"),
    "q_mobilenet_v2": _tvq("mobilenet_v2"),
    "q_mobilenet_v3_large": _tvq("mobilenet_v3_large"),
    "q_shufflenet_v2_x1_0": _tvq("shufflenet_v2_x1_0"),
    "q_googlenet": _tvq("googlenet", aux_logits=False, init_weights=False),
    "q_inception_v3": _tvq("inception_v3", aux_logits=False, init_weights=False),
    "vgg11_bn": _tv("vgg11_bn"),
    "alexnet": _tv("alexnet", min_size=64),
    "squeezenet1_0": _tv("squeezenet1_0"),
    "mnasnet1_0": _tv("mnasnet1_0"),
    "regnet_y_800mf": _tv("regnet_y_800mf"),
    "vit_b_32": _tv_kw("vit_b_32", "image_size", min_size=64),
    "r3d_18": _tv_video("r3d_18"),
    "mc3_18": _tv_video("mc3_18"),
    "r2plus1d_18": _tv_video("r2plus1d_18"),
    "s3d": _tv_video("s3d", frames=16, side=224),
}


def _hf(config_name: str, model_cls: str, text: bool = True, tokens: tuple[int, int] = (2, 16),
        **cfg: Any) -> Factory:
    def make(size: int) -> tuple[nn.Module, Callable[[int], tuple]]:
        import transformers

        config = transformers.AutoConfig.for_model(config_name, **cfg)
        model = getattr(transformers, model_cls)(config)
        if text:
            vocab = int(getattr(config, "vocab_size", 100))
            return model, lambda seed: (torch.randint(0, vocab, tokens, generator=torch.Generator().manual_seed(seed)),)
        side = getattr(config, "image_size", size)
        side = int(side[0] if isinstance(side, (list, tuple)) else side)
        return model, lambda seed: (torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed)),)

    return make


_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
HUGGINGFACE: dict[str, Factory] = {
    "bert": _hf("bert", "BertModel", **_SMALL),
    "distilbert": _hf("distilbert", "DistilBertModel", dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000),
    "roberta": _hf("roberta", "RobertaModel", **_SMALL),
    "albert": _hf("albert", "AlbertModel", embedding_size=32, **_SMALL),
    "electra": _hf("electra", "ElectraModel", embedding_size=32, **_SMALL),
    "gpt2": _hf("gpt2", "GPT2Model", n_embd=64, n_layer=2, n_head=4, vocab_size=1000, use_cache=False),
    "t5_encoder": _hf("t5", "T5EncoderModel", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      vocab_size=1000),
    "llama": _hf("llama", "LlamaModel", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, use_cache=False),
    "qwen2": _hf("qwen2", "Qwen2Model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, use_cache=False),
    "deberta_v2": _hf("deberta-v2", "DebertaV2Model", **_SMALL),
    "mobilebert": _hf("mobilebert", "MobileBertModel", embedding_size=32, intra_bottleneck_size=32,
                      true_hidden_size=32, num_feedforward_networks=2, **_SMALL),
    "bart": _hf("bart", "BartModel", d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000, use_cache=False),
    "vit": _hf("vit", "ViTModel", text=False, image_size=64, patch_size=16, **_SMALL),
    "clip_vision": _hf("clip_vision_model", "CLIPVisionModel", text=False, image_size=64, patch_size=16, **_SMALL),
    "convnext_hf": _hf("convnext", "ConvNextModel", text=False, image_size=64, hidden_sizes=[16, 32, 64, 128],
                       depths=[1, 1, 1, 1]),
}


# At the widths of the released base models (2 layers, batch 1, 128 tokens): where int8 pays off on text models;
# only with --only (a few minutes each)
HUGGINGFACE_WIDE: dict[str, Factory] = {
    "bert_base_2l": _hf("bert", "BertModel", tokens=(1, 128), hidden_size=768, num_hidden_layers=2,
                        num_attention_heads=12, intermediate_size=3072),
    "gpt2_base_2l": _hf("gpt2", "GPT2Model", tokens=(1, 128), n_embd=768, n_layer=2, n_head=12, use_cache=False),
}


def _hf_inputs(config_name: str, model_cls: str, make_inputs: Callable[[Any, int], tuple], **cfg: Any) -> Factory:
    """A Hugging Face model whose inputs are not token ids or a square image (audio features, raw waveforms)."""
    def make(size: int) -> tuple[nn.Module, Callable[[int], tuple]]:
        import transformers

        config = transformers.AutoConfig.for_model(config_name, **cfg)
        cls, _, part = model_cls.partition(".")  # "WhisperModel.encoder": that submodule of the model
        model = getattr(transformers, cls)(config)
        return (getattr(model, part) if part else model), lambda seed: make_inputs(config, seed)

    return make


def _mel(config: Any, seed: int) -> tuple:
    frames = 2 * int(config.max_source_positions)
    return (torch.randn(1, int(config.num_mel_bins), frames, generator=torch.Generator().manual_seed(seed)),)


def _wave(config: Any, seed: int) -> tuple:
    return (torch.randn(1, 4000, generator=torch.Generator().manual_seed(seed)),)


_TINY_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=1000, use_cache=False)
HUGGINGFACE_MORE: dict[str, Factory] = {
    "opt": _hf("opt", "OPTModel", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
               word_embed_proj_dim=64, vocab_size=1000, use_cache=False),
    "bloom": _hf("bloom", "BloomModel", hidden_size=64, n_layer=2, n_head=4, vocab_size=1000, use_cache=False),
    "falcon": _hf("falcon", "FalconModel", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=1000, use_cache=False),
    "phi": _hf("phi", "PhiModel", **_TINY_DECODER),
    "mistral": _hf("mistral", "MistralModel", num_key_value_heads=2, **_TINY_DECODER),
    "gpt_neox": _hf("gpt_neox", "GPTNeoXModel", **_TINY_DECODER),
    "xlm_roberta": _hf("xlm-roberta", "XLMRobertaModel", **_SMALL),
    "deit": _hf("deit", "DeiTModel", text=False, image_size=64, patch_size=16, **_SMALL),
    "beit": _hf("beit", "BeitModel", text=False, image_size=64, patch_size=16, **_SMALL),
    "dinov2": _hf("dinov2", "Dinov2Model", text=False, image_size=64, patch_size=16, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4),
    "swin_hf": _hf("swin", "SwinModel", text=False, image_size=64, patch_size=4, embed_dim=16, depths=[1, 1],
                   num_heads=[2, 4], window_size=4),
    "segformer": _hf("segformer", "SegformerModel", text=False, image_size=64, hidden_sizes=[16, 32, 64, 128],
                     depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 8], decoder_hidden_size=64),
    "mobilevit": _hf("mobilevit", "MobileViTModel", text=False, image_size=64, hidden_sizes=[32, 48, 64],
                     neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 128]),
    "resnet_hf": _hf("resnet", "ResNetModel", text=False, image_size=64, hidden_sizes=[16, 32, 64, 128],
                     depths=[1, 1, 1, 1], embedding_size=16),
    "whisper_encoder": _hf_inputs("whisper", "WhisperModel.encoder", _mel, d_model=64,
                                  encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                  num_mel_bins=16, max_source_positions=32, vocab_size=1000, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, use_cache=False),
    "wav2vec2": _hf_inputs("wav2vec2", "Wav2Vec2Model", _wave, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, conv_dim=[32, 32, 32],
                           conv_stride=[5, 2, 2], conv_kernel=[10, 3, 3], num_conv_pos_embeddings=16,
                           num_conv_pos_embedding_groups=4),
}


# families seen less often in int8 work, tried before a release (--even-more): mixture-of-experts routing, newer
# decoder variants, hierarchical vision backbones, speech encoders
HUGGINGFACE_EVEN_MORE: dict[str, Factory] = {
    "gemma": _hf("gemma", "GemmaModel", num_key_value_heads=2, head_dim=16, **_TINY_DECODER),
    "gemma2": _hf("gemma2", "Gemma2Model", num_key_value_heads=2, head_dim=16, **_TINY_DECODER),
    "qwen2_moe": _hf("qwen2_moe", "Qwen2MoeModel", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, shared_expert_intermediate_size=64, **_TINY_DECODER),
    "mixtral": _hf("mixtral", "MixtralModel", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                   **_TINY_DECODER),
    "gptj": _hf("gptj", "GPTJModel", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=1000,
                use_cache=False),
    "codegen": _hf("codegen", "CodeGenModel", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=1000,
                   use_cache=False),
    "gpt_bigcode": _hf("gpt_bigcode", "GPTBigCodeModel", n_embd=64, n_layer=2, n_head=4, vocab_size=1000,
                       use_cache=False),
    "starcoder2": _hf("starcoder2", "Starcoder2Model", num_key_value_heads=2, **_TINY_DECODER),
    "stablelm": _hf("stablelm", "StableLmModel", num_key_value_heads=2, **_TINY_DECODER),
    "olmo": _hf("olmo", "OlmoModel", num_key_value_heads=2, **_TINY_DECODER),
    "granite": _hf("granite", "GraniteModel", num_key_value_heads=2, **_TINY_DECODER),
    "mamba": _hf("mamba", "MambaModel", hidden_size=64, num_hidden_layers=2, state_size=8, vocab_size=1000,
                 use_cache=False),
    "squeezebert": _hf("squeezebert", "SqueezeBertModel", embedding_size=64, q_groups=2, k_groups=2, v_groups=2,
                       post_attention_groups=2, intermediate_groups=2, output_groups=2, **_SMALL),
    "funnel": _hf("funnel", "FunnelBaseModel", d_model=64, n_head=4, d_head=16, d_inner=128, block_sizes=[1, 1],
                  vocab_size=1000),
    "megatron_bert": _hf("megatron-bert", "MegatronBertModel", **_SMALL),
    "levit": _hf("levit", "LevitModel", text=False, image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2],
                 depths=[1, 1, 1], key_dim=[8, 8, 8]),
    "efficientnet_hf": _hf("efficientnet", "EfficientNetModel", text=False, image_size=64, width_coefficient=0.25,
                           depth_coefficient=0.25, hidden_dim=320),
    "convnextv2": _hf("convnextv2", "ConvNextV2Model", text=False, image_size=64, hidden_sizes=[16, 32, 64, 128],
                      depths=[1, 1, 1, 1]),
    "regnet_hf": _hf("regnet", "RegNetModel", text=False, image_size=64, hidden_sizes=[16, 32, 64, 128],
                     depths=[1, 1, 1, 1], groups_width=8, embedding_size=16),
    "poolformer": _hf("poolformer", "PoolFormerModel", text=False, image_size=64, hidden_sizes=[16, 32, 64, 128],
                      depths=[1, 1, 1, 1]),
    "pvt": _hf("pvt", "PvtModel", text=False, image_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
               num_attention_heads=[1, 2, 4, 8]),
    "mobilenet_v2_hf": _hf("mobilenet_v2", "MobileNetV2Model", text=False, image_size=64, depth_multiplier=0.5),
    "yolos": _hf("yolos", "YolosModel", text=False, image_size=[64, 64], patch_size=16, num_detection_tokens=10,
                 **_SMALL),
    "hubert": _hf_inputs("hubert", "HubertModel", _wave, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, conv_dim=[32, 32, 32], conv_stride=[5, 2, 2], conv_kernel=[10, 3, 3],
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
    "wavlm": _hf_inputs("wavlm", "WavLMModel", _wave, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, conv_dim=[32, 32, 32], conv_stride=[5, 2, 2], conv_kernel=[10, 3, 3],
                        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
}

# ------------------------------------------------------------------------------------------------------------ harness
class _Timeout(Exception):
    pass


def _alarm(_sig: int, _frame: Any) -> None:
    raise _Timeout("model took longer than --timeout seconds")


@dataclass
class Row:
    name: str
    status: str = "ok"
    sqnr_ref: Optional[float] = None
    sqnr_lowered: Optional[float] = None
    sqnr_torchao: Optional[float] = None
    times: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)  # --latency: ms per call, "fp32" / "fxquant" / "torchao"
    error: str = ""
    trace: str = ""


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def sqnr(ref: Any, out: Any) -> Optional[float]:
    """10 log10(|float|^2 / |float - quantized|^2) of the first tensor output, in dB."""
    a, b = _first_tensor(ref), _first_tensor(out)
    if a is None or b is None or a.shape != b.shape:
        return None
    a, b = a.detach().float(), b.detach().float()
    noise = (a - b).pow(2).mean().clamp_min(1e-20)
    return float(10 * torch.log10(a.pow(2).mean().clamp_min(1e-20) / noise))


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " | ")
    return text if len(text) < 400 else text[:397] + "..."


def warm_batch_norm(model: nn.Module, inputs: Callable[[int], tuple], batches: int = 2) -> None:
    """Give batch norms running statistics of real activations (train-mode passes, cumulative average).

    With random init and default running stats (mean 0, var 1), deep nets such as MobileNetV3 / EfficientNet shrink
    activations to ~1e-9 in eval mode, below the smallest scale an observer may pick (float32 eps): every model would
    then quantize to zeros, and SQNR would say nothing about fxquant.
    """
    for m in model.modules():  # zero-initialised heads (torchvision's ViT) make every output 0: SQNR says nothing
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for seed in range(100, 100 + batches):
            model(*(torch.cat([x] * 4) if isinstance(x, torch.Tensor) else x for x in inputs(seed)))
    model.eval()


def run_one(name: str, model: nn.Module, inputs: Callable[[int], tuple], verbose: bool,
            latency: int = 0) -> Row:
    """prepare -> calibrate (2 batches) -> reference -> convert; the first failing stage ends the row."""
    row = Row(name)
    model.eval()
    example = inputs(0)
    stage = "float"
    try:
        with torch.no_grad():
            expected = model(*example)
        stages: list[tuple[str, Callable[[Any], Any]]] = [
            ("prepare", lambda _: _prepare(model, example, row)),
            ("calibrate", lambda p: _calibrate(p, inputs)),
            ("reference", lambda p: (p, tq.convert_to_reference_fx(copy.deepcopy(p)))),
            ("convert", lambda pr: (pr[1], tq.convert_fx(pr[0]))),
        ]
        value: Any = None
        for stage, fn in stages:
            start = time.perf_counter()
            value = fn(value)
            row.times[stage] = time.perf_counter() - start
        reference, lowered = value
        stage = "run reference"
        with torch.no_grad():
            row.sqnr_ref = sqnr(expected, reference(*example))
        stage = "run convert"
        with torch.no_grad():
            row.sqnr_lowered = sqnr(expected, lowered(*example))
        row.sqnr_torchao = torchao_reference_sqnr(model, inputs, expected)
        if latency:
            stage = "latency"
            row.latency = measure_latency({"fp32": model, "fxquant": lowered, "torchao": torchao_converted(model, inputs)},
                                          example, latency)
    except Exception as exc:  # noqa: BLE001 — a table of failures is the point
        row.status, row.error = f"FAIL {stage}", _short(exc)
        row.trace = traceback.format_exc() if verbose else ""
    return row


def torchao_reference_sqnr(model: nn.Module, inputs: Callable[[int], tuple], expected: Any) -> Optional[float]:
    """The same recipe with torch.ao (where this torch still has it): an oracle for what SQNR to expect of a random
    model. None when torch.ao is missing or fails on the model."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx
    except ImportError:
        return None
    try:
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), inputs(0))
        reference = convert_to_reference_fx(_calibrate(prepared, inputs))
        with torch.no_grad():
            return sqnr(expected, reference(*inputs(0)))
    except Exception:  # noqa: BLE001 — torch.ao's own failures are not ours to report
        return None


def torchao_converted(model: nn.Module, inputs: Callable[[int], tuple]) -> Optional[nn.Module]:
    """torch.ao's ``convert_fx`` (x86) of the same recipe, for the latency columns; None without torch.ao."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), inputs(0))
        return convert_fx(_calibrate(prepared, inputs))  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001
        return None


def measure_latency(models: dict[str, Optional[nn.Module]], example: tuple, rounds: int) -> dict[str, float]:
    """Median milliseconds per call of each model on ``example``, rounds interleaved (one thread, no grad)."""
    live = {k: m for k, m in models.items() if m is not None}
    samples: dict[str, list[float]] = {k: [] for k in live}
    with torch.no_grad():
        for m in live.values():
            m(*example)
        for _ in range(rounds):
            for k, m in live.items():
                start = time.perf_counter()
                m(*example)
                samples[k].append(time.perf_counter() - start)
    return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in samples.items()}


def _prepare(model: nn.Module, example: tuple, row: Row) -> nn.Module:
    """prepare_fx; the row's status says when fxquant had to trace on the example inputs (plain torch.fx failed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = tq.prepare_fx(model, tq.get_default_qconfig_mapping("x86"), example)
    if any("traced it on example_inputs" in str(w.message) for w in caught):
        row.status = "ok (traced on inputs)"
    return prepared


def _calibrate(prepared: nn.Module, inputs: Callable[[int], tuple]) -> nn.Module:
    with torch.no_grad():
        for seed in (1, 2):
            prepared(*inputs(seed))
    return prepared


class _Named(nn.Module):
    """What fxquant's error message suggests for a decorated forward: a wrapper whose forward names its input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)


def _hf_alternative(model: nn.Module, example: tuple) -> tuple[str, nn.Module]:
    """transformers' own FX tracer where it still exists (removed in transformers 5), else the suggested wrapper."""
    try:
        from transformers.utils import fx as hf_fx
    except ImportError:
        return "wrapped", _Named(model)
    names = ["pixel_values"] if example[0].is_floating_point() else ["input_ids"]
    return "hf_trace", hf_fx.symbolic_trace(model, input_names=names)


def _models(args: argparse.Namespace) -> list[tuple[str, Factory, bool]]:
    tv, hf = dict(TORCHVISION), dict(HUGGINGFACE)
    if args.more or args.even_more or args.only:
        tv.update(TORCHVISION_MORE)
        hf.update(HUGGINGFACE_MORE)
    if args.even_more or args.only:
        hf.update(HUGGINGFACE_EVEN_MORE)
    if args.only:
        hf.update(HUGGINGFACE_WIDE)
    out = [] if args.skip_tv else [(n, f, False) for n, f in tv.items()]
    out += [] if args.skip_hf else [(n, f, True) for n, f in hf.items()]
    return [m for m in out if not args.only or m[0] in args.only]


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:5.1f}"


def print_table(rows: list[Row]) -> None:
    print("\n| model | status | SQNR ref dB | SQNR lowered dB | torch.ao ref dB | prepare s | calib s | ref s | convert s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = [f"{r.times[s]:.2f}" if s in r.times else "-" for s in ("prepare", "calibrate", "reference", "convert")]
        print(f"| {r.name} | {r.status} | {_fmt(r.sqnr_ref)} | {_fmt(r.sqnr_lowered)} | {_fmt(r.sqnr_torchao)} | {' | '.join(t)} |")
    timed = [r for r in rows if r.latency]
    if timed:
        print("\n| model | fp32 ms | fxquant ms | torch.ao ms | fp32 / fxquant | torch.ao / fxquant |")
        print("|---|---|---|---|---|---|")
        for r in timed:
            f, q, a = (r.latency.get(k) for k in ("fp32", "fxquant", "torchao"))
            ratio = f"{a / q:.2f}" if a and q else "-"
            print(f"| {r.name} | {f:.2f} | {q:.2f} | {_fmt(a)} | {f / q:.2f} | {ratio} |")
    failed = [r for r in rows if r.error]
    if failed:
        print("\nFailures:")
        for r in failed:
            print(f"* {r.name} ({r.status}): {r.error}")
            if r.trace:
                print(r.trace)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=[], help="model names to run")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-tv", action="store_true")
    parser.add_argument("--more", action="store_true",
                        help="also the quantizable / video / VGG torchvision models and more Hugging Face families")
    parser.add_argument("--even-more", action="store_true",
                        help="--more plus mixture-of-experts, newer decoders, hierarchical vision and speech families")
    parser.add_argument("--size", type=int, default=96, help="image side (models with a minimum use theirs)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--latency", type=int, default=0, metavar="ROUNDS",
                        help="also time fp32 / fxquant / torch.ao convert_fx at batch 1 (median of ROUNDS calls)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGALRM, _alarm)
    rows: list[Row] = []
    for name, factory, is_hf in _models(args):
        torch.manual_seed(0)
        try:
            model, inputs = factory(args.size)
            warm_batch_norm(model, inputs)
        except Exception as exc:  # noqa: BLE001
            rows.append(Row(name, "SKIP build", error=_short(exc)))
            continue
        signal.alarm(args.timeout)
        try:
            rows.append(run_one(name, model, inputs, args.verbose, args.latency))
            if is_hf and rows[-1].error:
                rows.append(_run_hf_alternative(name, model, inputs, args.verbose))
        except _Timeout as exc:
            rows.append(Row(name, "TIMEOUT", error=str(exc)))
        finally:
            signal.alarm(0)
        print(f"{rows[-1].name}: {rows[-1].status} {rows[-1].error[:160]}", file=sys.stderr, flush=True)
    print_table(rows)
    return 0


def _run_hf_alternative(name: str, model: nn.Module, inputs: Callable[[int], tuple], verbose: bool) -> Row:
    try:
        how, alternative = _hf_alternative(model.eval(), inputs(0))
    except Exception as exc:  # noqa: BLE001
        return Row(f"{name}+hf_trace", "FAIL hf_trace", error=_short(exc))
    return run_one(f"{name}+{how}", alternative, inputs, verbose)


if __name__ == "__main__":
    sys.exit(main())
