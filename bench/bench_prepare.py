"""Time prepare_fx / convert_to_reference_fx / convert_fx on deep stacks, torch.ao vs fxquant, one thread.

    .venv/bin/python bench/bench_prepare.py --quick               # small sizes, a minute or so
    .venv/bin/python bench/bench_prepare.py                       # 50..1600 Linear+ReLU, 25..400 residual conv blocks
    .venv/bin/python bench/bench_prepare.py --only fxquant        # one library

Models: a stack of N (Linear(16, 16), ReLU) blocks, and a stem conv followed by N residual blocks
(conv-bn-relu-conv-bn, add, relu; 8 channels). Both libraries get get_default_qconfig_mapping("x86") from their own
namespace and the same example input. With --observers minmax (the default) its global qconfig is replaced by
default_per_channel_qconfig (MinMax activations), so the table measures the graph pipeline; with --observers default
the x86 HistogramObserver stays, and convert then mostly times its L2 range search (~170 ms per observer in torch.ao,
linear in graph size). Each stage is timed alone (median over --repeats); calibration (one batch) and the deep copies
that let both conversions start from the same prepared model are not timed. A stage that took longer than --budget
seconds is skipped for that library at larger sizes. Prints a markdown table; the ratio column is torch.ao time /
fxquant time (> 1: fxquant faster). fxquant is imported lazily: '-' where it is missing, 'error' (with a footnote)
where a stage raises.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import statistics
import sys
import time
import warnings

import torch
import torch.fx
import torch.nn as nn

STAGES = ("prepare", "reference", "convert")
FULL = {"linear_relu": (50, 200, 800, 1600), "res_conv": (25, 100, 400)}
QUICK = {"linear_relu": (25, 100), "res_conv": (10, 25)}


def linear_relu_stack(n: int):
    torch.manual_seed(0)
    layers = []
    for _ in range(n):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers).eval(), (torch.randn(4, 16),)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


def res_conv_stack(n: int, c: int = 8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[ResBlock(c) for _ in range(n)])
    return model.eval(), (torch.randn(1, 3, 8, 8),)


BUILDERS = {"linear_relu": linear_relu_stack, "res_conv": res_conv_stack}


class Lib:
    """The three entry points and the default mapping of one library, or why it is unavailable."""

    def __init__(self, name: str):
        self.name = name
        self.missing = None
        try:
            if name == "torchao":
                self.fx = importlib.import_module("torch.ao.quantization.quantize_fx")
                self.ns = [importlib.import_module("torch.ao.quantization")]
            else:
                self.fx = importlib.import_module("fxquant.quantize_fx")
                self.ns = [importlib.import_module(m) for m in ("fxquant", "fxquant.qconfig_mapping", "fxquant.qconfig")
                           if importlib.util.find_spec(m) is not None]
            self._name("get_default_qconfig_mapping")
        except (ImportError, AttributeError) as e:
            self.missing = f"{type(e).__name__}: {e}"

    def _name(self, attr: str):
        for ns in self.ns:
            if hasattr(ns, attr):
                return getattr(ns, attr)
        raise AttributeError(f"{self.name} has no {attr}")

    def mapping(self, observers: str):
        mapping = self._name("get_default_qconfig_mapping")("x86")
        if observers == "minmax":
            mapping.set_global(self._name("default_per_channel_qconfig"))
        return mapping

    def run(self, model, example, repeats: int, stages, observers: str) -> dict[str, float | Exception]:
        """Median seconds of each of ``stages``, or the exception a stage raised (a failed prepare fails them all).

        prepare always runs (the conversions need it) but is only reported when asked for."""
        times: dict[str, list] = {s: [] for s in stages}
        failed: dict[str, Exception] = {}
        for _ in range(repeats):
            m = copy.deepcopy(model)
            try:
                mapping = self.mapping(observers)
                prepared = _timed(times.get("prepare"), lambda: self.fx.prepare_fx(m, mapping, example))
                with torch.no_grad():
                    prepared(*example)
            except Exception as e:  # a library still being written: report, keep going
                return {s: e for s in stages}
            for stage, fn in (("reference", self.fx.convert_to_reference_fx), ("convert", self.fx.convert_fx)):
                if stage in stages and stage not in failed:
                    p = copy.deepcopy(prepared)
                    try:
                        _timed(times[stage], lambda: fn(p))
                    except Exception as e:
                        failed[stage] = e
        return {s: failed.get(s) or statistics.median(times[s]) for s in stages}


def _timed(acc: list | None, fn):
    gc.collect()
    t = time.perf_counter()
    out = fn()
    if acc is not None:
        acc.append(time.perf_counter() - t)
    return out


def _fmt(v) -> str:
    return v if isinstance(v, str) else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only: " + str(QUICK))
    ap.add_argument("--only", choices=("fxquant", "torchao"), help="time one library")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 3 quick, 1 full)")
    ap.add_argument("--models", nargs="+", choices=tuple(BUILDERS), default=list(BUILDERS))
    ap.add_argument("--observers", choices=("minmax", "default"), default="minmax",
                    help="minmax: time the pipeline; default: keep the x86 HistogramObserver (convert = its search)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="skip a library's stage at larger sizes once it took longer than this many seconds")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 1)
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    names = [args.only] if args.only else ["torchao", "fxquant"]
    libs = {n: Lib(n) for n in names}
    print(f"# bench_prepare: torch {torch.__version__}, 1 thread, median of {repeats}, observers: {args.observers}")
    print(f"command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}")
    for lib in libs.values():
        if lib.missing:
            print(f"{lib.name}: not available ({lib.missing})")
        else:  # warm up: lazy imports and first-call caches are not what we measure
            for build in BUILDERS.values():
                lib.run(*build(1), 1, STAGES, args.observers)
    print()
    print("| model | blocks | graph nodes | stage | torch.ao s | fxquant s | torch.ao / fxquant | "
          "torch.ao ms/block | fxquant ms/block |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    notes: list[str] = []
    over_budget: set = set()  # (lib, model, stage)
    for model_name in args.models:
        for n in sizes[model_name]:
            model, example = BUILDERS[model_name](n)
            nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
            results = {}
            for lib_name in ("torchao", "fxquant"):
                lib = libs.get(lib_name)
                if lib is None or lib.missing:
                    results[lib_name] = {s: "-" for s in STAGES}
                    continue
                stages = [s for s in STAGES if (lib_name, model_name, s) not in over_budget]
                res: dict = {s: "skip" for s in STAGES}
                if stages:
                    res.update(lib.run(model, example, repeats, stages, args.observers))
                for s, v in res.items():
                    if isinstance(v, Exception):
                        note = f"{lib_name}: {type(v).__name__}: {(str(v).splitlines() or [''])[0][:200]}"
                        if note not in notes:
                            notes.append(note)
                        res[s] = f"error[{notes.index(note) + 1}]"
                    if isinstance(v, float) and v > args.budget:
                        over_budget.add((lib_name, model_name, s))
                results[lib_name] = res
            for stage in STAGES:
                a, f = results["torchao"][stage], results["fxquant"][stage]
                ratio = f"{a / f:.1f}x" if isinstance(a, float) and isinstance(f, float) and f > 0 else "-"
                per = [f"{v * 1000 / n:.2f}" if isinstance(v, float) else "-" for v in (a, f)]
                print(f"| {model_name} | {n} | {nodes} | {stage} | {_fmt(a)} | {_fmt(f)} | {ratio} | {per[0]} | "
                      f"{per[1]} |", flush=True)
    if over_budget:
        print(f"\nskip: the stage took over --budget {args.budget:g} s at a smaller size")
    for i, note in enumerate(notes, 1):
        print(f"\n[{i}] {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
