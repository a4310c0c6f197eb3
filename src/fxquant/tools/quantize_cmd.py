"""``fxquant quantize``: a user's model and data -> prepare -> calibrate -> convert -> saved model + HTML report.

The Python equivalent, step by step, is in docs/USAGE.md; this module only adds the checks and messages a command
line needs (every user mistake becomes a :class:`~fxquant.tools.userload.UserInputError`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .presets import backend_config_for, qconfig_mapping_for, skip_modules
from .userload import UserInputError, load_batches, load_model, shapes

__all__ = ["QuantizeOptions", "run_quantize"]


@dataclass
class QuantizeOptions:
    """The ``fxquant quantize`` arguments."""

    model: str
    calib: str
    out: Optional[str] = None
    report: Optional[str] = None
    backend: str = "x86"
    qconfig: str = "default"
    skip: list[str] = field(default_factory=list)
    calib_batches: Optional[int] = None
    non_traceable: list[str] = field(default_factory=list)
    progress: bool = True


def _check_runs(model: nn.Module, inputs: tuple) -> None:
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - the user's data does not fit the user's model
        raise UserInputError(f"the model fails on the first calibration batch (inputs {shapes(inputs)}): "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Make --calib "
                             f"yield batches shaped like the model's forward arguments") from None


def _prepare(model: nn.Module, opts: QuantizeOptions, example: tuple) -> Any:
    from ..passes.trace import TraceFailure
    from ..quantize_fx import prepare_fx

    mapping = qconfig_mapping_for(opts.qconfig, opts.backend)
    try:
        skipped = skip_modules(mapping, model, opts.skip)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    if skipped:
        print(f"leaving in float: {', '.join(skipped)}")
    try:
        return prepare_fx(copy.deepcopy(model), mapping, example, prepare_custom_config=_custom_config(model, opts),
                          backend_config=backend_config_for(opts.backend))
    except TraceFailure as exc:
        raise UserInputError(f"the model cannot be traced by torch.fx. {exc}\n(on the command line: "
                             f"--non-traceable MODULE_PATH)") from None


def _custom_config(model: nn.Module, opts: QuantizeOptions) -> Any:
    """PrepareCustomConfig for --non-traceable; their classes (the user's own code) are registered for saving."""
    from ..custom_config import PrepareCustomConfig
    from .serialize import register_safe

    if not opts.non_traceable:
        return None
    names = dict(model.named_modules())
    missing = [n for n in opts.non_traceable if n not in names]
    if missing:
        sample = ", ".join(n for n in list(names)[1:9])
        raise UserInputError(f"--non-traceable {', '.join(missing)}: no such module; module names look like: {sample}")
    for name in opts.non_traceable:
        cls = type(names[name])
        if not cls.__module__.startswith(("torch.", "fxquant.")):
            register_safe(cls)
            print(f"{name} stays float and keeps its class {cls.__module__}.{cls.__qualname__}: loading the saved "
                  f"model needs register_safe({cls.__name__}) (fxquant explain --trust {cls.__module__}:"
                  f"{cls.__qualname__})")
    return PrepareCustomConfig().set_non_traceable_module_names(list(opts.non_traceable))


def _calibrate(prepared: nn.Module, batches: list[tuple], progress: bool) -> None:
    with torch.no_grad():
        for i, batch in enumerate(tqdm(batches, desc="calibrate", unit="batch", disable=not progress)):
            try:
                prepared(*batch)
            except Exception as exc:  # noqa: BLE001 - a later batch of a different shape
                raise UserInputError(f"calibration batch {i} (inputs {shapes(batch)}) fails: {type(exc).__name__}: "
                                     f"{exc}; all batches must fit the model") from None


def _step(label: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    print(f"{label:<10} {time.perf_counter() - start:7.2f} s")
    return out


def run_quantize(opts: QuantizeOptions) -> nn.Module:
    """Run the whole command; returns the quantized model (also saved / reported when asked)."""
    from ..quantize_fx import convert_fx
    from .compare import compare
    from .explain import explain
    from .serialize import save

    model, example = load_model(opts.model)
    batches = load_batches(opts.calib, opts.calib_batches)
    example = example or batches[0]
    _check_runs(model, batches[0])
    prepared = _step("prepare", lambda: _prepare(model, opts, example))
    _step("calibrate", lambda: _calibrate(prepared, batches, opts.progress))
    quantized = _step("convert", lambda: convert_fx(prepared))
    rows = explain(quantized)
    print(f"{sum(r.quantized for r in rows)} of {len(rows)} ops quantized (fxquant explain <file> says why not)")
    if opts.out:
        _step("save", lambda: save(quantized, opts.out))
        print(f"saved {opts.out}")
    if opts.report:
        report = _step("compare", lambda: compare(model, quantized, batches[0], progress=opts.progress))
        print(report.table(limit=10))
        report.to_html(opts.report)
        print(f"report {opts.report}")
    return quantized
