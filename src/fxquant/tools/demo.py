"""``fxquant demo``: train a small CNN on scikit-learn's bundled 8x8 digits, quantize it, compare float and int8.

Offline and quick (well under a minute on 2 CPU cores): the data set ships inside scikit-learn. Steps:

1. train a 2-conv + BN + 2-linear CNN on 80% of the 1797 digits (progress bar per epoch),
2. ``prepare_fx`` with ``get_default_qconfig_mapping("x86")``, calibrate on training batches (progress bar),
   ``convert_fx``,
3. measure accuracy on the held-out 20%, the size of the model state, latency (median, batch 1 and 64).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["DigitsCNN", "DemoResult", "load_digits_data", "run_demo", "format_result", "state_bytes",
           "median_latencies", "accuracy"]


class DigitsCNN(nn.Module):
    """1x8x8 -> conv-bn-relu (16) -> conv-bn-relu (32) -> maxpool -> linear-relu (64) -> linear (10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu(self.fc1(x)))


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured (seconds, bytes, fractions)."""

    float_accuracy: float
    int8_accuracy: float
    float_bytes: int
    int8_bytes: int
    float_latency: dict[int, float]  # batch size -> median seconds per call
    int8_latency: dict[int, float]
    train_seconds: float
    prepare_seconds: float
    calibrate_seconds: float
    convert_seconds: float
    n_train: int
    n_test: int
    lowered_layers: int = 0  # layers running on int8 kernels (the rest run as quantize -> float op -> dequantize)
    quantized_layers: int = 0


def load_digits_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): digits as float32 N x 1 x 8 x 8 in [0, 1], an 80/20 seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("fxquant demo needs scikit-learn for its bundled digits data set: "
                           "pip install scikit-learn") from exc
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (no fork / join per op)
    try:
        _epochs(model, x, y, epochs, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=not progress)
    for _ in bar:
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(y):.3f}")
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in batches of 256."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 256):
            correct += int((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum())
    return correct / len(y)


def state_bytes(model: nn.Module) -> int:
    """Bytes of all tensors in ``model.state_dict()`` (weights, biases, qparams, buffers)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def median_latencies(models: list[nn.Module], x: torch.Tensor, repeats: int, budget_s: float = 2.0) -> list[float]:
    """Median wall time of ``m(x)`` for each model, measured in interleaved rounds (so that load from other
    processes hits all models alike) after 2 warm-up calls; at most ``repeats`` rounds or ``budget_s`` seconds
    (at least 3 rounds)."""
    times: list[list[float]] = [[] for _ in models]
    start_all = time.perf_counter()
    with torch.no_grad():
        for model in models:
            model(x)
            model(x)
        for i in range(repeats):
            for model, bucket in zip(models, times):
                start = time.perf_counter()
                model(x)
                bucket.append(time.perf_counter() - start)
            if i >= 2 and time.perf_counter() - start_all > budget_s:
                break
    return [statistics.median(t) for t in times]


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_demo(quick: bool = False, seed: int = 0, progress: bool = True, epochs: Optional[int] = None) -> DemoResult:
    """Train, quantize and measure; ``quick`` trains 2 epochs and times fewer repeats (for tests)."""
    from ..qconfig_mapping import get_default_qconfig_mapping
    from ..quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_data(seed)
    model = DigitsCNN()
    _, t_train = _timed(lambda: _train(model, x_train, y_train, epochs or (2 if quick else 6), seed, progress))
    example = (x_train[:1],)
    prepared, t_prepare = _timed(lambda: prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"),
                                                    example))
    batches = [x_train[i:i + 64] for i in range(0, min(len(x_train), 256 if quick else 512), 64)]

    def calibrate() -> None:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
                prepared(batch)  # type: ignore[operator]

    _, t_calibrate = _timed(calibrate)
    quantized, t_convert = _timed(lambda: convert_fx(prepared))  # type: ignore[arg-type]
    repeats = 5 if quick else 50
    budget = 0.5 if quick else 2.0
    lat = {b: median_latencies([model, quantized], x_test[:b], repeats, budget)  # type: ignore[list-item]
           for b in (1, 64)}
    lat_f, lat_q = {b: v[0] for b, v in lat.items()}, {b: v[1] for b, v in lat.items()}
    return DemoResult(accuracy(model, x_test, y_test), accuracy(quantized, x_test, y_test),  # type: ignore[arg-type]
                      state_bytes(model), state_bytes(quantized), lat_f, lat_q, t_train, t_prepare,  # type: ignore
                      t_calibrate, t_convert, len(y_train), len(y_test), *_kernel_counts(quantized))


def _kernel_counts(model: object) -> tuple[int, int]:
    """(layers on lowered int8 kernels, quantized weighted layers) of a converted model."""
    lowered = weighted = 0
    for mod in model.modules():  # type: ignore[attr-defined]
        if callable(getattr(mod, "float_weight", None)):
            lowered += 1
            weighted += 1
        elif callable(getattr(mod, "get_weight", None)) and hasattr(mod, "weight_int"):
            weighted += 1
    return lowered, weighted


def format_result(r: DemoResult) -> str:
    """The demo's summary table."""
    def ms(s: float) -> str:
        return f"{s * 1e3:.3f} ms"

    rows = [("", "float32", "int8 (fxquant)", "ratio"),
            (f"accuracy ({r.n_test} held-out digits)", f"{r.float_accuracy:.2%}", f"{r.int8_accuracy:.2%}",
             f"{(r.int8_accuracy - r.float_accuracy) * 100:+.2f} pts"),
            ("model size (state bytes)", f"{r.float_bytes:,}", f"{r.int8_bytes:,}",
             f"{r.float_bytes / r.int8_bytes:.2f}x smaller")]
    for b in sorted(r.float_latency):
        rows.append((f"latency, batch {b} (median)", ms(r.float_latency[b]), ms(r.int8_latency[b]),
                     f"{r.float_latency[b] / r.int8_latency[b]:.2f}x speedup"))
    width = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, width)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    lines.append("")
    lines.append(f"train {r.train_seconds:.1f} s ({r.n_train} digits) | prepare_fx {r.prepare_seconds * 1e3:.0f} ms | "
                 f"calibrate {r.calibrate_seconds * 1e3:.0f} ms | convert_fx {r.convert_seconds * 1e3:.0f} ms")
    from fxquant.kernels import native
    state = native.status()
    lines.append(f"{r.lowered_layers} of {r.quantized_layers} quantized layers run on int8 kernels; torch threads: "
                 f"{torch.get_num_threads()}; native FBGEMM kernels: "
                 f"{state if state == 'available' else 'not used (' + state + '; fxquant native)'}")
    if r.lowered_layers < r.quantized_layers:
        lines.append("(the others run as quantize -> dequantize -> float op: accurate, smaller, not faster)")
    return "\n".join(lines)
