"""HistogramObserver calibration cost: fxquant vs torch.ao in the same run (medians, interleaved rounds).

    .venv/bin/python bench/bench_observers.py [--batch 8] [--repeats 5] [--threads 1]

For each ResNet-50 activation shape (post-ReLU, batch ``--batch``) it feeds the same fresh tensors to one
fxquant and one torch.ao HistogramObserver (default arguments: 2048 bins, uint8) and reports

* ``forward``: median time of one calibration batch (min / max, histogram update and merge),
* ``qparams``: median time of ``calculate_qparams()`` (the L2 search for the clipping range),

each as ``ms fxquant | ms torch.ao | ratio`` (ratio = torch.ao / fxquant, > 1 means fxquant is faster). The two
observers are checked to hold the same histogram and give the same qparams. Figures on a shared machine are
noisy; rounds are interleaved so machine load hits both alike.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from fxquant.observer import HistogramObserver

# (channels, height, width) of the outputs of ResNet-50's stem and its four stages at 224x224
RESNET50_ACTIVATIONS = [(64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each candidate over ``repeats`` rounds, the candidates alternating in each round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def bench_shape(shape: tuple[int, ...], repeats: int, reference: type) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    batches = [torch.relu(torch.randn(shape, generator=g) * (1 + 0.1 * k)) for k in range(repeats + 1)]
    ours, theirs = HistogramObserver(), reference()
    ours(batches[0])
    theirs(batches[0])
    fwd: dict[str, list[float]] = {"fxquant": [], "torch.ao": []}
    order = [("fxquant", ours), ("torch.ao", theirs)]
    for k, x in enumerate(batches[1:]):  # both observers see every batch; who goes first alternates
        for name, obs in order if k % 2 == 0 else order[::-1]:
            fwd[name].append(_timed(lambda obs=obs: obs(x)))
    forward = {name: statistics.median(ts) * 1e3 for name, ts in fwd.items()}
    qparams = _interleaved({"fxquant": ours.calculate_qparams, "torch.ao": theirs.calculate_qparams},
                           max(1, repeats // 2))
    assert torch.equal(ours.histogram, theirs.histogram), "histograms differ"
    (s, z), (ts, tz) = ours.calculate_qparams(), theirs.calculate_qparams()
    assert torch.equal(s, ts) and torch.equal(z.long(), tz.long()), "qparams differ"
    return {"forward": forward, "qparams": qparams}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.ao.quantization.observer import HistogramObserver as Reference
    warnings.simplefilter("ignore")
    print(f"HistogramObserver, ResNet-50 activations, batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.repeats}; ratio = torch.ao / fxquant")
    print(f"{'shape':>22} | {'forward ms: fxquant  torch.ao  ratio':>36} | {'qparams ms: fxquant  torch.ao  ratio':>36}")
    for chw in RESNET50_ACTIVATIONS:
        shape = (args.batch, *chw)
        r = bench_shape(shape, args.repeats, Reference)
        f, q = r["forward"], r["qparams"]
        print(f"{str(shape):>22} | {f['fxquant']:>17.1f} {f['torch.ao']:>9.1f} {f['torch.ao'] / f['fxquant']:>6.2f}x"
              f" | {q['fxquant']:>17.1f} {q['torch.ao']:>9.1f} {q['torch.ao'] / q['fxquant']:>6.2f}x")


if __name__ == "__main__":
    main()
