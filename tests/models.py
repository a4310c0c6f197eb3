"""Real architectures, written by hand, for differential tests of the FX quantization pipeline.

Every factory returns ``(model.eval(), example_inputs)`` built from a fixed seed (the global RNG state is left
untouched), small enough for a CPU forward well under 0.2 s. :data:`MODELS` maps a name to a :class:`ModelSpec`
holding the factory, recommended :class:`Recipe` s, tracing facts and a seeded calibration-data generator.

A :class:`Recipe` is plain data. ``recipe.build(ns)`` turns it into a QConfigMapping using only torch.ao's public
names looked up on ``ns`` -- so the *same* recipe builds torch.ao's objects from ``torch.ao.quantization`` and
fxquant's from ``fxquant``::

    spec = MODELS["resnet18"]
    model, example_inputs = spec.factory()
    recipe = spec.recipe()                       # the recommended one (first)
    mapping = recipe.build(torch.ao.quantization)   # or recipe.build(fxquant)
    pcc = recipe.prepare_custom_config(torch.ao.quantization, model, example_inputs)
    batches = spec.calibration_data()
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Recipe", "ModelSpec", "MODELS", "FACTORIES", "model_names", "get_spec", "lookup",
    "capture_submodule_inputs", "seeded",
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "bert_encoder", "lstm_classifier", "embedding_bag_recsys",
    "functional_net", "functional_positional_net", "branchy_net", "standalone_net", "shufflenet", "segmentation_head",
]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

class seeded:
    """``with seeded(s):`` runs the block under ``torch.manual_seed(s)`` and restores the global CPU RNG after."""

    def __init__(self, seed: int):
        self.seed = seed
        self._ctx = None

    def __enter__(self):
        self._ctx = torch.random.fork_rng(devices=[])
        self._ctx.__enter__()
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _randomize_bn(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine params, so that folding it changes the weights."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)


def _build(seed: int, ctor: Callable[[], nn.Module], make_inputs: Callable[[torch.Generator], tuple]):
    with seeded(seed):
        model = ctor()
        _randomize_bn(model)
    gen = torch.Generator().manual_seed(seed)
    return model.eval(), make_inputs(gen)


def _image(gen: torch.Generator, batch: int = 2, channels: int = 3, size: int = 32) -> tuple:
    return (torch.randn(batch, channels, size, size, generator=gen),)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# ----------------------------------------------------------------------------------------------------------------
# ResNet-18 style
# ----------------------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # one module, called twice (as torchvision does)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), widths=(8, 16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = widths[0]
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(inplanes, w, 2 if (i > 0 and j == 0) else 1))
                inplanes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(seed: int = 0):
    return _build(seed, ResNet, _image)


# ----------------------------------------------------------------------------------------------------------------
# MobileNetV2
# ----------------------------------------------------------------------------------------------------------------

class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(*_conv_bn(cin, cout, k, stride, groups), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, 1))
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden), *_conv_bn(hidden, cout, 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (stride)
    SETTINGS = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 1, 1))

    def __init__(self, num_classes: int = 10, last_channel: int = 64, settings: tuple = (), stem: int = 8):
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU6(3, stem, 3, 2)]
        cin = stem
        for t, c, n, s in settings or self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU6(cin, last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(seed: int = 0):
    return _build(seed, MobileNetV2, _image)


# ----------------------------------------------------------------------------------------------------------------
# MobileNetV3-small
# ----------------------------------------------------------------------------------------------------------------

class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return scale * x


class V3Block(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, use_se: bool, act: str, stride: int):
        super().__init__()
        act_layer = nn.Hardswish if act == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(nn.Sequential(*_conv_bn(cin, exp, 1), act_layer()))
        layers.append(nn.Sequential(*_conv_bn(exp, exp, k, stride, groups=exp), act_layer()))
        if use_se:
            layers.append(SqueezeExcitation(exp, max(8, exp // 4)))
        layers.append(nn.Sequential(*_conv_bn(exp, cout, 1)))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        if self.use_res_connect:
            out = out + x
        return out


class MobileNetV3Small(nn.Module):
    # cin, kernel, expanded, cout, SE, activation, stride
    SETTINGS = ((8, 3, 8, 8, True, "RE", 2), (8, 3, 36, 12, False, "RE", 2), (12, 3, 44, 12, False, "RE", 1),
                (12, 5, 48, 20, True, "HS", 2), (20, 5, 60, 20, True, "HS", 1), (20, 5, 60, 24, True, "HS", 1))

    def __init__(self, num_classes: int = 10, settings: tuple = (), hidden: int = 64):
        super().__init__()
        settings = settings or self.SETTINGS
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, settings[0][0], 3, 2), nn.Hardswish())]
        layers += [V3Block(*s) for s in settings]
        last = 6 * settings[-1][3]
        layers.append(nn.Sequential(*_conv_bn(settings[-1][3], last, 1), nn.Hardswish()))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, hidden), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v3_small(seed: int = 0):
    return _build(seed, MobileNetV3Small, _image)


# ----------------------------------------------------------------------------------------------------------------
# BERT-style encoder
# ----------------------------------------------------------------------------------------------------------------

VOCAB = 100


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, s = x.size(0), x.size(1)
        q = self.query(x).view(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)
        k = self.key(x).view(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)
        v = self.value(x).reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = F.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v)
        ctx = ctx.permute(0, 2, 1, 3).contiguous().reshape(b, s, self.heads * self.head_dim)
        return self.dense(ctx)


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int):
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.attn_norm = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()
        self.output = nn.Linear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden)

    def forward(self, x):
        x = self.attn_norm(x + self.attention(x))
        return self.out_norm(x + self.output(self.act(self.intermediate(x))))


class BertEncoder(nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 4, layers: int = 2, intermediate: int = 64, max_len: int = 32,
                 num_classes: int = 3):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, hidden)
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, intermediate) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.pool_act = nn.Tanh()
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x)
        pooled = self.pool_act(self.pooler(x[:, 0]))
        return self.classifier(pooled)


def _token_ids(gen: torch.Generator, batch: int = 2, seq: int = 16) -> tuple:
    return (torch.randint(0, VOCAB, (batch, seq), generator=gen),)


def bert_encoder(seed: int = 0):
    return _build(seed, BertEncoder, _token_ids)


# ----------------------------------------------------------------------------------------------------------------
# LSTM classifier (dynamic quantization)
# ----------------------------------------------------------------------------------------------------------------

class LSTMClassifier(nn.Module):
    def __init__(self, embed: int = 16, hidden: int = 32, num_classes: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens):
        out, (h, c) = self.lstm(self.embedding(tokens))
        return self.fc(out[:, -1])


def lstm_classifier(seed: int = 0):
    return _build(seed, LSTMClassifier, lambda g: _token_ids(g, 2, 12))


# ----------------------------------------------------------------------------------------------------------------
# EmbeddingBag recommendation model (weight-only)
# ----------------------------------------------------------------------------------------------------------------

class RecSys(nn.Module):
    TABLES = (200, 120)

    def __init__(self, dim: int = 16, dense_in: int = 8, tables: tuple = ()):
        super().__init__()
        tables = tables or self.TABLES
        self.emb_user = nn.EmbeddingBag(tables[0], dim, mode="sum")
        self.emb_item = nn.EmbeddingBag(tables[1], dim, mode="mean")
        self.bottom = nn.Sequential(nn.Linear(dense_in, dim), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(3 * dim, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, dense, user_idx, user_off, item_idx, item_off):
        d = self.bottom(dense)
        u = self.emb_user(user_idx, user_off)
        i = self.emb_item(item_idx, item_off)
        return torch.sigmoid(self.top(torch.cat([d, u, i], dim=1)))


def _recsys_inputs(gen: torch.Generator, batch: int = 4) -> tuple:
    def bags(n_rows: int):
        lengths = torch.randint(1, 5, (batch,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        return torch.randint(0, n_rows, (int(lengths.sum()),), generator=gen), offsets

    ui, uo = bags(RecSys.TABLES[0])
    ii, io = bags(RecSys.TABLES[1])
    return (torch.randn(batch, 8, generator=gen), ui, uo, ii, io)


def embedding_bag_recsys(seed: int = 0):
    return _build(seed, RecSys, _recsys_inputs)


# ----------------------------------------------------------------------------------------------------------------
# Functional conv / linear (keyword arguments, int stride) -- where torch.ao is known to stumble
# ----------------------------------------------------------------------------------------------------------------

class FunctionalNet(nn.Module):
    def __init__(self, keyword_args: bool = True, widths: tuple = (8, 16)):
        super().__init__()
        self.keyword_args = keyword_args
        c1, c2 = widths
        self.w1 = nn.Parameter(torch.randn(c1, 3, 3, 3) * 0.2)
        self.b1 = nn.Parameter(torch.randn(c1) * 0.1)
        self.w2 = nn.Parameter(torch.randn(c2, c1, 3, 3) * 0.1)
        self.b2 = nn.Parameter(torch.randn(c2) * 0.1)
        self.fc_w = nn.Parameter(torch.randn(10, c2) * 0.2)
        self.fc_b = nn.Parameter(torch.randn(10) * 0.1)

    def forward(self, x):
        if self.keyword_args:  # Python-level flag: fixed at trace time
            x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
            x = F.relu(F.conv2d(x, self.w2, bias=self.b2, stride=2, padding=1))
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            return F.linear(input=x, weight=self.fc_w, bias=self.fc_b)
        x = F.relu(F.conv2d(x, self.w1, self.b1, (1, 1), (1, 1), (1, 1), 1))
        x = F.relu(F.conv2d(x, self.w2, self.b2, (2, 2), (1, 1), (1, 1), 1))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.linear(x, self.fc_w, self.fc_b)


def functional_net(seed: int = 0):
    """F.conv2d(x, w, b, padding=1), int stride as keyword, F.linear with all-keyword arguments."""
    return _build(seed, lambda: FunctionalNet(True), lambda g: _image(g, 2, 3, 16))


def functional_positional_net(seed: int = 0):
    """The same computation as :func:`functional_net`, every argument positional (the spelling torch.ao handles)."""
    return _build(seed, lambda: FunctionalNet(False), lambda g: _image(g, 2, 3, 16))


# ----------------------------------------------------------------------------------------------------------------
# Data-dependent branch inside a submodule (trace only when "gate" is non-traceable)
# ----------------------------------------------------------------------------------------------------------------

class DataDependentGate(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.pos = nn.Linear(dim, dim)
        self.neg = nn.Linear(dim, dim)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return F.relu(self.pos(x))
        return self.neg(x)


class BranchyNet(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.fc_in = nn.Linear(8, dim)
        self.gate = DataDependentGate(dim)
        self.fc_out = nn.Linear(dim, 4)

    def forward(self, x):
        return self.fc_out(self.gate(self.fc_in(x)))


def _branchy_inputs(gen: torch.Generator, batch: int = 4) -> tuple:
    return (torch.randn(batch, 8, generator=gen),)


def branchy_net(seed: int = 0):
    return _build(seed, BranchyNet, _branchy_inputs)


# ----------------------------------------------------------------------------------------------------------------
# Standalone submodule
# ----------------------------------------------------------------------------------------------------------------

class ResidualUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(self.relu(self.conv1(x))))


class StandaloneNet(nn.Module):
    def __init__(self, c: int = 8, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, c, 3, 2), nn.ReLU())
        self.body = ResidualUnit(c)  # configured as a standalone module by the recipe
        self.head = nn.Conv2d(c, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.head(self.body(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def standalone_net(seed: int = 0):
    return _build(seed, StandaloneNet, lambda g: _image(g, 2, 3, 16))


# ----------------------------------------------------------------------------------------------------------------
# ShuffleNet-style (channel shuffle, chunk, cat)
# ----------------------------------------------------------------------------------------------------------------

def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(*_conv_bn(cin, cin, 3, stride, groups=cin), *_conv_bn(cin, half, 1), nn.ReLU())
            b2_in = cin
        else:
            self.branch1 = nn.Identity()
            b2_in = half
        self.branch2 = nn.Sequential(*_conv_bn(b2_in, half, 1), nn.ReLU(), *_conv_bn(half, half, 3, stride, groups=half),
                                     *_conv_bn(half, half, 1), nn.ReLU())

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self, num_classes: int = 10, channels: tuple = (8, 16, 32), repeats: tuple = (2, 3), last: int = 64):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(3, channels[0], 3, 2), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage_names = [f"stage{i + 2}" for i in range(len(repeats))]
        for name, cin, cout, n in zip(self.stage_names, channels, channels[1:], repeats):
            setattr(self, name, nn.Sequential(ShuffleUnit(cin, cout, 2), *[ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]))
        self.conv5 = nn.Sequential(*_conv_bn(channels[-1], last, 1), nn.ReLU())
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)


def shufflenet(seed: int = 0):
    return _build(seed, ShuffleNet, _image)


# ----------------------------------------------------------------------------------------------------------------
# Segmentation head (upsample / interpolate, cat)
# ----------------------------------------------------------------------------------------------------------------

class SegHead(nn.Module):
    def __init__(self, num_classes: int = 4, widths: tuple = (8, 16, 16)):
        super().__init__()
        w1, w2, w3 = widths
        self.enc1 = nn.Sequential(*_conv_bn(3, w1, 3, 2), nn.ReLU())
        self.enc2 = nn.Sequential(*_conv_bn(w1, w2, 3, 2), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Sequential(*_conv_bn(w1 + w2, w3, 3), nn.ReLU())
        self.cls = nn.Conv2d(w3, num_classes, 1)

    def forward(self, x):
        f1 = self.enc1(x)
        f2 = self.enc2(f1)
        y = self.fuse(torch.cat([self.up(f2), f1], dim=1))
        y = self.cls(y)
        return F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)


def segmentation_head(seed: int = 0):
    return _build(seed, SegHead, _image)


# ----------------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------------

# Where torch.ao-style names live besides the top-level namespace (torch.ao.quantization / fxquant).
_SUBMODULES = ("qconfig_mapping", "qconfig", "quantize_fx", "fx.custom_config", "custom_config", "backend_config",
               "backend_config.x86", "observer", "fake_quantize")


def lookup(ns: Any, name: str) -> Any:
    """``ns.<name>``, else the same name in one of torch.ao's usual submodules of ``ns`` (when ``ns`` is a package).

    Raises AttributeError naming everything it tried."""
    if hasattr(ns, name):
        return getattr(ns, name)
    tried = [getattr(ns, "__name__", repr(ns))]
    if isinstance(ns, ModuleType):
        for sub in _SUBMODULES:
            full = f"{ns.__name__}.{sub}"
            try:
                mod = importlib.import_module(full)
            except ImportError:
                continue
            tried.append(full)
            if hasattr(mod, name):
                return getattr(mod, name)
    raise AttributeError(f"{name!r} not found in {', '.join(tried)}")


def _qconfig(ns: Any, ref: Any) -> Any:
    if ref is None:
        return None
    if isinstance(ref, str):
        return lookup(ns, ref)
    return ref(ns)


@dataclass(frozen=True)
class Recipe:
    """How to quantize a model, written once for any library that spells torch.ao's API.

    kind:        "static" | "dynamic" | "weight_only"
    default_mapping: start from ``ns.get_default_qconfig_mapping(backend)``; else from an empty ``ns.QConfigMapping()``
    global_qconfig / object_types / module_names: entries set on top (a qconfig is the *name* of one in ``ns``,
        a callable ``ns -> qconfig``, or None for "leave in float"); object types are torch classes, functions or
        method-name strings, identical for every library
    non_traceable_module_names / standalone_module_names: PrepareCustomConfig needs
    backend_config: name of a BackendConfig factory in ``ns`` (e.g. "get_qnnpack_backend_config"); None = native
    """
    name: str
    kind: str = "static"
    backend: str = "x86"
    default_mapping: bool = True
    global_qconfig: Any = None
    object_types: tuple = ()
    module_names: tuple = ()
    non_traceable_module_names: tuple = ()
    standalone_module_names: tuple = ()
    backend_config: str | None = None
    note: str = ""

    def __post_init__(self):
        if self.kind not in ("static", "dynamic", "weight_only"):
            raise ValueError(f"Recipe kind must be static/dynamic/weight_only, got {self.kind!r}")

    def build(self, ns: Any) -> Any:
        """The QConfigMapping of this recipe, built from ``ns`` (torch.ao.quantization, fxquant, ...)."""
        if self.default_mapping:
            mapping = lookup(ns, "get_default_qconfig_mapping")(self.backend)
        else:
            mapping = lookup(ns, "QConfigMapping")()
        if self.global_qconfig is not None:
            mapping.set_global(_qconfig(ns, self.global_qconfig))
        for obj, ref in self.object_types:
            mapping.set_object_type(obj, _qconfig(ns, ref))
        for name, ref in self.module_names:
            mapping.set_module_name(name, _qconfig(ns, ref))
        return mapping

    def prepare_custom_config(self, ns: Any, model: nn.Module | None = None, example_inputs: tuple | None = None):
        """A PrepareCustomConfig from ``ns``, or None when the recipe needs none.

        Standalone modules get their own example inputs, captured by running ``model`` on ``example_inputs``."""
        if not (self.non_traceable_module_names or self.standalone_module_names):
            return None
        pcc = lookup(ns, "PrepareCustomConfig")()
        if self.non_traceable_module_names:
            pcc.set_non_traceable_module_names(list(self.non_traceable_module_names))
        if self.standalone_module_names:
            if model is None or example_inputs is None:
                raise ValueError(f"recipe {self.name!r} has standalone modules: pass model and example_inputs")
            sub_inputs = capture_submodule_inputs(model, example_inputs, self.standalone_module_names)
            for name in self.standalone_module_names:
                pcc.set_standalone_module_name(name, None, sub_inputs[name], None, None)
        return pcc

    def get_backend_config(self, ns: Any):
        return None if self.backend_config is None else lookup(ns, self.backend_config)()


def capture_submodule_inputs(model: nn.Module, example_inputs: tuple, names) -> dict[str, tuple]:
    """Positional inputs each named submodule receives (first call) when ``model(*example_inputs)`` runs."""
    captured: dict[str, tuple] = {}
    handles = []
    for name in names:
        def hook(mod, args, _name=name):
            captured.setdefault(_name, tuple(args))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in captured]
    if missing:
        raise ValueError(f"submodules never called: {missing}")
    return captured


STATIC_X86 = Recipe("static_x86", note="get_default_qconfig_mapping('x86') on the native backend config")
STATIC_QNNPACK = Recipe("static_qnnpack", backend="qnnpack", backend_config="get_qnnpack_backend_config",
                        note="uint8 0..255 activations, per-tensor weights. torch.ao's lowered model is only accurate "
                             "with torch.backends.quantized.engine = 'qnnpack' (x86/fbgemm kernels saturate)")
DYNAMIC_LINEAR = Recipe("dynamic_linear", kind="dynamic", default_mapping=False,
                        object_types=((nn.Linear, "default_dynamic_qconfig"),))


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture.

    fx_traceable: ``torch.fx.symbolic_trace(model)`` succeeds as is; otherwise ``leaf_modules`` names the submodules
    a tracer must keep as leaves (what a recipe's non_traceable_module_names declares).
    torchao_known_failures: recipe name -> (first stage that fails: "prepare" | "reference" | "lowered", why) for
        torch.ao 2.13.
    """
    name: str
    factory: Callable[..., tuple[nn.Module, tuple]]
    make_inputs: Callable[[torch.Generator], tuple]
    recipes: tuple[Recipe, ...]
    fx_traceable: bool = True
    leaf_modules: tuple[str, ...] = ()
    torchao_known_failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    description: str = ""

    def recipe(self, name: str | None = None) -> Recipe:
        """The named recipe, or the recommended one (first)."""
        if name is None:
            return self.recipes[0]
        for r in self.recipes:
            if r.name == name:
                return r
        raise KeyError(f"{self.name} has no recipe {name!r}; it has {[r.name for r in self.recipes]}")

    def trace(self, model: nn.Module) -> torch.fx.GraphModule:
        """``torch.fx`` trace of ``model`` keeping ``leaf_modules`` as leaves (plain symbolic_trace when none)."""
        leaves = set(self.leaf_modules)

        class _Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m, qualname):
                return qualname in leaves or super().is_leaf_module(m, qualname)

        return torch.fx.GraphModule(model, _Tracer().trace(model))

    def calibration_data(self, n_batches: int = 4, seed: int = 1) -> list[tuple]:
        """``n_batches`` input tuples shaped like the example inputs, drawn from ``seed`` (deterministic)."""
        gen = torch.Generator().manual_seed(seed)
        return [self.make_inputs(gen) for _ in range(n_batches)]


def _branchy_calibration(gen: torch.Generator) -> tuple:
    # alternate the sign of the mean so both branches of the gate run during calibration
    (x,) = _branchy_inputs(gen)
    shift = 1.0 if torch.rand((), generator=gen) > 0.5 else -1.0
    return (x + shift,)


_SPECS = [
    ModelSpec("resnet18", resnet18, _image, (STATIC_X86, STATIC_QNNPACK),
              description="BasicBlock x [2,2,2,2], BN, residual add + ReLU, adaptive avg pool, flatten, fc"),
    ModelSpec("mobilenet_v2", mobilenet_v2, _image, (STATIC_X86, STATIC_QNNPACK),
              description="inverted residuals, depthwise conv, ReLU6, F.adaptive_avg_pool2d"),
    ModelSpec("mobilenet_v3_small", mobilenet_v3_small, _image, (STATIC_X86,),
              description="hardswish, hardsigmoid squeeze-excite with mul, residual add"),
    ModelSpec("bert_encoder", bert_encoder, _token_ids,
              (DYNAMIC_LINEAR,
               Recipe("static_x86", object_types=((nn.Embedding, "float_qparams_weight_only_qconfig"),),
                      note="default x86 mapping; embeddings weight-only")),
              description="embeddings, linear, matmul, softmax, layernorm, gelu, residual add, view/permute/transpose"),
    ModelSpec("lstm_classifier", lstm_classifier, lambda g: _token_ids(g, 2, 12),
              (Recipe("dynamic", kind="dynamic", default_mapping=False,
                      object_types=((nn.LSTM, "default_dynamic_qconfig"), (nn.Linear, "default_dynamic_qconfig"))),
               Recipe("dynamic_weight_only_embedding", kind="dynamic", default_mapping=False,
                      object_types=((nn.LSTM, "default_dynamic_qconfig"), (nn.Linear, "default_dynamic_qconfig"),
                                    (nn.Embedding, "float_qparams_weight_only_qconfig")))),
              description="embedding + 2-layer nn.LSTM (tuple output unpacked) + linear"),
    ModelSpec("embedding_bag_recsys", embedding_bag_recsys, _recsys_inputs,
              (Recipe("weight_only", kind="weight_only", default_mapping=False,
                      object_types=((nn.EmbeddingBag, "float_qparams_weight_only_qconfig"),)),
               # torch.ao fuses Linear+ReLU first and insists both carry the same qconfig (LookupError otherwise)
               Recipe("weight_only_dynamic_linear", kind="dynamic", default_mapping=False,
                      object_types=((nn.EmbeddingBag, "float_qparams_weight_only_qconfig"),
                                    (nn.Linear, "default_dynamic_qconfig"), (nn.ReLU, "default_dynamic_qconfig")))),
              description="two EmbeddingBags with offsets (sum / mean) + dense MLP, cat, sigmoid"),
    ModelSpec("functional", functional_net, lambda g: _image(g, 2, 3, 16), (STATIC_X86,),
              torchao_known_failures={
                  "static_x86": ("lowered", "torch.ao's lowering reads functional conv/linear arguments by position "
                                 "and as lists: F.linear(input=, weight=, bias=) fails ('Dequantize index 0 exceeded "
                                 "reference node's arg length 0'); F.conv2d with keyword or missing stride/padding/"
                                 "dilation, or an int stride, fails in quantized::conv2d_prepack. Reference is fine.")},
              description="F.conv2d(x, w, b, padding=1), keyword bias + int stride, F.linear with keyword args"),
    ModelSpec("functional_positional", functional_positional_net, lambda g: _image(g, 2, 3, 16), (STATIC_X86,),
              description="the functional model with every argument positional"),
    ModelSpec("branchy", branchy_net, _branchy_calibration,
              (Recipe("static_x86_non_traceable_gate", non_traceable_module_names=("gate",)),),
              fx_traceable=False, leaf_modules=("gate",),
              description="data-dependent `if x.mean() > 0` inside submodule 'gate'"),
    ModelSpec("standalone", standalone_net, lambda g: _image(g, 2, 3, 16),
              (Recipe("static_x86_standalone_body", standalone_module_names=("body",)),),
              description="conv stem, residual unit 'body' prepared as a standalone module, conv head, fc"),
    ModelSpec("shufflenet", shufflenet, _image, (STATIC_X86,),
              description="channel shuffle (view/transpose/contiguous), chunk, cat, depthwise conv, mean"),
    ModelSpec("segmentation_head", segmentation_head, _image, (STATIC_X86,),
              description="nn.Upsample(nearest), cat skip connection, F.interpolate(bilinear)"),
]

MODELS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
FACTORIES: dict[str, Callable[..., tuple[nn.Module, tuple]]] = {s.name: s.factory for s in _SPECS}


def model_names() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {model_names()}") from None
