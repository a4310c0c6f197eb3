"""Time the lowered normalization / softmax / matmul modules against the reference form they replace.

The reference form is what ``convert_fx`` runs for an op without a lowering rule: a ``DeQuantize`` module per
input, the float op, a ``Quantize`` module. One thread, interleaved rounds, medians (microseconds)::

    .venv/bin/python bench/bench_lowered_norms.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fxquant.nn import quantized as Q

Case = tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]]


def _q(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _cases() -> list[Case]:
    s_in, z_in, s_out, z_out = 0.05, 120, 0.03, 128
    dq, qz = Q.DeQuantize(s_in, z_in), Q.Quantize(s_out, z_out)
    cases: list[Case] = []

    x = _q((1, 128, 768), 0)
    w, b = torch.randn(768), torch.randn(768)
    ln = Q.QuantizedNorm("layer_norm", s_in, z_in, s_out, z_out, w, b, 1e-12, normalized_shape=(768,))
    cases.append(("LayerNorm 1x128x768", lambda: qz(F.layer_norm(dq(x), (768,), w, b, 1e-12)), lambda: ln(x)))

    img = _q((1, 64, 56, 56), 1).contiguous(memory_format=torch.channels_last)
    gw, gb = torch.randn(64), torch.randn(64)
    gn = Q.QuantizedNorm("group_norm", s_in, z_in, s_out, z_out, gw, gb, 1e-5, num_groups=32)
    cases.append(("GroupNorm(32) 1x64x56x56 cl", lambda: qz(F.group_norm(dq(img), 32, gw, gb, 1e-5)),
                  lambda: gn(img)))
    inorm = Q.QuantizedNorm("instance_norm", s_in, z_in, s_out, z_out, gw, gb, 1e-5)
    cases.append(("InstanceNorm2d 1x64x56x56 cl",
                  lambda: qz(F.instance_norm(dq(img), None, None, gw, gb, True, 0.1, 1e-5)), lambda: inorm(img)))

    scores = _q((1, 12, 128, 128), 2)
    p_q = Q.Quantize(1 / 256, 0)
    sm = Q.QuantizedSoftmax(-1, s_in / math.sqrt(64), 1 / 256, 0)
    cases.append(("softmax(x / 8) 1x12x128x128", lambda: p_q(F.softmax(dq(scores) / math.sqrt(64), dim=-1)),
                  lambda: sm(scores)))

    qa, qb, qv = _q((1, 12, 128, 64), 3), _q((1, 12, 64, 128), 4), _q((1, 12, 128, 64), 5)
    dqa, dqb = Q.DeQuantize(0.04, 128), Q.DeQuantize(0.03, 120)
    mm = Q.QuantizedMatmul((0.04, 128), (0.03, 120), (s_out, z_out))
    cases.append(("matmul 12x128x64 @ 12x64x128", lambda: qz(torch.matmul(dqa(qa), dqb(qb))), lambda: mm(qa, qb)))
    dqp = Q.DeQuantize(1 / 256, 0)
    pv = Q.QuantizedMatmul((1 / 256, 0), (0.03, 120), (s_out, z_out))
    probs = _q((1, 12, 128, 128), 6)
    cases.append(("matmul 12x128x128 @ 12x128x64", lambda: qz(torch.matmul(dqp(probs), dqb(qv))),
                  lambda: pv(probs, qv)))
    ba, bb = qa.reshape(12, 128, 64), qb.reshape(12, 64, 128)
    bsm = Q.QuantizedMatmul((0.04, 128), (0.03, 120), (1 / 256, 0), softmax_dim=-1, logit_multiplier=0.125)
    cases.append(("bmm + softmax 12x128x64 @ 12x64x128",
                  lambda: p_q(torch.softmax(torch.bmm(dqa(ba), dqb(bb)) * 0.125, -1)), lambda: bsm(ba, bb)))
    return cases


def _time(fns: dict[str, Callable[[], torch.Tensor]], rounds: int, reps: int) -> dict[str, float]:
    for f in fns.values():
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            for _ in range(reps):
                f()
            times[name].append((time.perf_counter() - t) / reps * 1e6)
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median of {args.rounds} interleaved rounds x {args.reps} calls (us)")
    print(f"{'op':40s} {'reference':>10s} {'lowered':>10s} {'ratio':>7s} {'max steps':>9s}")
    with torch.no_grad():
        for name, ref, low in _cases():
            t = _time({"ref": ref, "low": low}, args.rounds, args.reps)
            steps = int((ref().int() - low().int()).abs().max())
            print(f"{name:40s} {t['ref']:10.1f} {t['low']:10.1f} {t['ref'] / t['low']:6.2f}x {steps:9d}")


if __name__ == "__main__":
    main()
