"""Latency of converted models: fp32 vs torch.ao convert_fx vs fxquant convert_fx, on the test architectures.

    .venv/bin/python bench/bench_convert.py                 # every model, batch 1 and 16, 1 and 2 threads
    .venv/bin/python bench/bench_convert.py --quick         # batch 1 and 16, 1 thread, fewer rounds (~2 min)
    .venv/bin/python bench/bench_convert.py --models resnet18 shufflenet --threads 1 --batches 1

Each model is quantized by both libraries with its recommended recipe from tests/models.py (``get_default_qconfig_
mapping("x86")`` for the image models; dynamic for bert_encoder / lstm_classifier; weight-only embedding bags for
the recsys model), calibrated on the same batches, then converted with ``convert_fx``. Latency: the three models
run in interleaved rounds (so load from other processes hits all three alike); each round times ``--inner`` calls
of each; the table shows the median per-call time over rounds, and ratios from the same rounds (speed-ups: > 1
means faster than the other). Conversion time (median of 3) and state-dict size are reported per model. Timings
are noisy on a shared machine: the load average is printed with the table, and with 2 threads on a busy 2-core
machine OpenMP waits can dominate (rows of tens of ms for sub-ms models): read those rows with care.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import models  # noqa: E402
import oracle  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import full_size  # noqa: E402

VARIANTS = ("fp32", "torchao", "fxquant")


def rebatch(spec: models.ModelSpec, example: tuple, batch: int) -> tuple:
    """Inputs like ``example`` with ``batch`` samples (repeating the example's first sample)."""
    if spec.name == "embedding_bag_recsys":
        return models._recsys_inputs(torch.Generator().manual_seed(0), batch)
    n0 = example[0].shape[0]
    out = []
    for t in example:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n0:
            reps = [math.ceil(batch / n0)] + [1] * (t.dim() - 1)
            t = t.repeat(*reps)[:batch].contiguous()
        out.append(t)
    return tuple(out)


@dataclass
class Prepared:
    name: str
    models: dict[str, Optional[torch.nn.Module]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    convert_ms: dict[str, float] = field(default_factory=dict)
    size_kb: dict[str, float] = field(default_factory=dict)
    example: tuple = ()
    size: str = "tiny"


def _state_kb(model: torch.nn.Module) -> float:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 1024


def _float_model(spec: models.ModelSpec, size: str) -> tuple[torch.nn.Module, tuple, list]:
    """(float model, example inputs, calibration batches) of the tiny test model or its full-size build."""
    if size == "full":
        model, example = full_size.build(spec.name, 2)
        return model, example, [full_size.inputs(spec.name, b) for b in (3, 4)]
    model, example = spec.factory()
    return model, example, spec.calibration_data()


def _convert(lib: oracle.Lib, spec: models.ModelSpec, res: Prepared) -> None:
    recipe = spec.recipe()
    model, example, calibration = _float_model(spec, res.size)
    try:
        q = oracle.quantize(lib, model, recipe, example, calibration, stages=())
        times = []
        for _ in range(3):
            start = time.perf_counter()
            lowered = oracle.to_lowered(lib, q.prepared, recipe)  # includes one deepcopy of the prepared model
            times.append((time.perf_counter() - start) * 1e3)
        res.models[lib.name] = lowered.eval()
        res.convert_ms[lib.name] = statistics.median(times)
        res.size_kb[lib.name] = _state_kb(lowered)
    except Exception as err:  # noqa: BLE001  (a library failing on a model is a result)
        res.models[lib.name] = None
        res.errors[lib.name] = f"{type(err).__name__}: {str(err)[:120]}"


def prepare_model(name: str, size: str = "tiny") -> Prepared:
    spec = models.get_spec(name)
    model, example, _ = _float_model(spec, size)
    res = Prepared(name, example=example, size=size)
    res.models["fp32"] = model
    res.size_kb["fp32"] = _state_kb(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _convert(oracle.torchao_lib(), spec, res)
        _convert(oracle.fxquant_lib(), spec, res)
    return res


def _run(model: torch.nn.Module, inputs: tuple, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        model(*inputs)
    return (time.perf_counter() - start) / inner


def time_models(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds: per-call seconds of each variant in each round."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            out[key].append(fn())
    return out


def measure(res: Prepared, batch: int, threads: int, rounds: int, target_s: float) -> dict[str, Any]:
    torch.set_num_threads(threads)
    spec = models.get_spec(res.name)
    inputs = full_size.inputs(res.name, batch) if res.size == "full" else rebatch(spec, res.example, batch)
    live = {k: m for k, m in res.models.items() if m is not None}
    row: dict[str, Any] = {"model": res.name, "batch": batch, "threads": threads}
    with torch.no_grad():
        for k, m in list(live.items()):
            try:
                for _ in range(3):
                    m(*inputs)
            except Exception as err:  # noqa: BLE001
                res.errors[k] = f"{type(err).__name__}: {str(err)[:120]}"
                del live[k]
        once = max(_run(m, inputs, 1) for m in live.values())
        inner = max(1, min(200, int(target_s / max(once, 1e-6))))
        times = time_models({k: (lambda m=m: _run(m, inputs, inner)) for k, m in live.items()}, rounds)
    for k in VARIANTS:
        row[k] = statistics.median(times[k]) * 1e3 if k in times else None
    for a, b in (("fp32", "fxquant"), ("torchao", "fxquant"), ("fp32", "torchao")):
        if a in times and b in times:
            row[f"{a}/{b}"] = statistics.median(x / y for x, y in zip(times[a], times[b]))
    return row


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def print_tables(rows: list[dict[str, Any]], prepared: list[Prepared]) -> None:
    print("\n| model | batch | threads | fp32 ms | torch.ao ms | fxquant ms | fxquant vs fp32 | fxquant vs torch.ao "
          "| torch.ao vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['threads']} | {_fmt(r['fp32'])} | {_fmt(r['torchao'])} | "
              f"{_fmt(r['fxquant'])} | {_fmt(r.get('fp32/fxquant'), 2)}x | {_fmt(r.get('torchao/fxquant'), 2)}x | "
              f"{_fmt(r.get('fp32/torchao'), 2)}x |")
    print()
    for threads in sorted({r["threads"] for r in rows}):
        for key, label in (("torchao/fxquant", "fxquant vs torch.ao"), ("fp32/fxquant", "fxquant vs fp32"),
                           ("fp32/torchao", "torch.ao vs fp32")):
            vals = [r[key] for r in rows if r.get(key) and r["threads"] == threads]
            if vals:
                print(f"- {threads} thread(s), geomean speed-up {label}: {geomean(vals):.2f}x over {len(vals)} rows "
                      f"(min {min(vals):.2f}x, max {max(vals):.2f}x); latency ratio {1 / geomean(vals):.2f}")
    print("\n| model | convert torch.ao ms | convert fxquant ms | size fp32 KiB | size torch.ao KiB | "
          "size fxquant KiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in prepared:
        print(f"| {p.name} | {_fmt(p.convert_ms.get('torchao'), 1)} | {_fmt(p.convert_ms.get('fxquant'), 1)} | "
              f"{_fmt(p.size_kb.get('fp32'), 1)} | {_fmt(p.size_kb.get('torchao'), 1)} | "
              f"{_fmt(p.size_kb.get('fxquant'), 1)} |")
    for p in prepared:
        for lib, err in p.errors.items():
            print(f"- {p.name}: {lib} failed: {err}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 thread, 5 rounds")
    parser.add_argument("--size", choices=("full", "tiny"), default="full",
                        help="full: the architectures at their usual widths and input sizes (bench/full_size.py); "
                             "tiny: the test zoo's models as they are in the tests (per-call overhead dominates)")
    parser.add_argument("--models", nargs="*", default=None,
                        help=f"subset of {models.model_names()} (full size: {list(full_size.FACTORIES)})")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--target-ms", type=float, default=None, help="time per variant per round")
    args = parser.parse_args(argv)
    threads = args.threads or ([1] if args.quick else [1, 2])
    rounds = args.rounds or (5 if args.quick else 9)
    target_s = (args.target_ms or (30.0 if args.quick else 60.0)) / 1e3
    names = args.models or (list(full_size.FACTORIES) if args.size == "full" else models.model_names())
    print(f"# {' '.join(sys.argv)}\n# torch {torch.__version__}, load average {os.getloadavg()}, "
          f"threads {threads}, rounds {rounds}, size {args.size}")
    prepared = [prepare_model(n, args.size) for n in names]
    rows = [measure(p, b, t, rounds, target_s) for p in prepared for t in threads for b in args.batches]
    print_tables(rows, prepared)
    print(f"\n# load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
