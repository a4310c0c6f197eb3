"""Full-size builds of the test architectures (tests/models.py) for the latency benchmark.

The test zoo keeps its models tiny (8-64 channels, 32x32 images) so that the correctness tests run in seconds; at
that size a converted model's time is mostly per-call overhead. Here the same classes get the widths, depths and
input sizes they have in practice (torchvision's ResNet-18 / MobileNetV2 / MobileNetV3-small / ShuffleNetV2-1.0
widths at 224x224, a BERT-base-width encoder on 128 tokens, ...). ``BUILDERS[name](batch)`` returns
``(float model in eval mode, example inputs with that batch size)``; weights are random but seeded and BatchNorm
statistics non-trivial (as in the zoo). Nothing is downloaded.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import models  # noqa: E402

IMAGE = 224
MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
MBV3_SMALL = ((16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
              (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
              (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
              (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1))
RECSYS_TABLES = (100_000, 50_000)


def _images(batch: int, size: int = IMAGE) -> tuple:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)),)


def _tokens(batch: int, seq: int) -> tuple:
    return (torch.randint(0, models.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch)),)


def _recsys_inputs(batch: int) -> tuple:
    gen = torch.Generator().manual_seed(batch)

    def bags(rows: int):
        lengths = torch.randint(1, 20, (batch,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        return torch.randint(0, rows, (int(lengths.sum()),), generator=gen), offsets

    ui, uo = bags(RECSYS_TABLES[0])
    ii, io = bags(RECSYS_TABLES[1])
    return (torch.randn(batch, 13, generator=gen), ui, uo, ii, io)


def _seeded(ctor: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with models.seeded(0):
        model = ctor()
        models._randomize_bn(model)
    return model.eval()


FACTORIES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], tuple]]] = {
    "resnet18": (lambda: models.ResNet(widths=(64, 128, 256, 512), num_classes=1000), _images),
    "mobilenet_v2": (lambda: models.MobileNetV2(num_classes=1000, last_channel=1280, settings=MBV2, stem=32),
                     _images),
    "mobilenet_v3_small": (lambda: models.MobileNetV3Small(num_classes=1000, settings=MBV3_SMALL, hidden=1024),
                           _images),
    "bert_encoder": (lambda: models.BertEncoder(hidden=768, heads=12, layers=2, intermediate=3072, max_len=128),
                     lambda b: _tokens(b, 128)),
    "lstm_classifier": (lambda: models.LSTMClassifier(embed=128, hidden=256), lambda b: _tokens(b, 32)),
    "embedding_bag_recsys": (lambda: models.RecSys(dim=64, dense_in=13, tables=RECSYS_TABLES), _recsys_inputs),
    "functional": (lambda: models.FunctionalNet(True, widths=(32, 64)), lambda b: _images(b, 112)),
    "shufflenet": (lambda: models.ShuffleNet(num_classes=1000, channels=(24, 116, 232, 464), repeats=(4, 8, 4),
                                             last=1024), _images),
    "segmentation_head": (lambda: models.SegHead(num_classes=21, widths=(32, 64, 64)), _images),
}


def build(name: str, batch: int = 1) -> tuple[torch.nn.Module, tuple]:
    """The full-size float model ``name`` and example inputs of ``batch`` samples."""
    ctor, inputs = FACTORIES[name]
    return _seeded(ctor), inputs(batch)


def inputs(name: str, batch: int) -> tuple:
    return FACTORIES[name][1](batch)
