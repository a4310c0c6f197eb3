"""A pass registry and the stages of fxquant, each a tuple of pass names.

A mode is a different tuple, never a flag threaded through functions::

    PREPARE     = trace, fuse, assign_qconfig, special_modules, annotate, share, observe, quantized_io,
                  record_state, verify_prepared
    PREPARE_QAT = the same with qat_swap after assign_qconfig
    REFERENCE   = quantized_inputs, to_reference, quantized_outputs, bake_parametrizations, verify_reference
    CONVERT     = quantized_inputs, to_reference, quantized_outputs, bake_parametrizations, verify_reference, lower,
                  cleanup, quantized_io_attach, verify_lowered, sign_lowered

(``quantized_*`` passes do nothing unless PrepareCustomConfig declares quantized inputs / outputs.)

``run(gm, stage, ctx, hook=...)`` calls the passes in order; a hook sees the graph module after every pass
(dump, verify, time: ``fxquant.pipeline.timing_hook``). Passes edit ``gm.graph`` only; ``run`` regenerates the
Python code once at the end of the stage (a hook that wants to call the module in between calls ``recompile``).
"""
from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

__all__ = ["Context", "register_pass", "run", "PASSES", "PREPARE", "PREPARE_QAT", "FUSE", "REFERENCE", "CONVERT",
           "timing_hook"]

PassFn = Callable[[nn.Module, "Context"], nn.Module]
PASSES: dict[str, PassFn] = {}

FUSE = ("trace", "fuse")
PREPARE = ("trace", "fuse", "assign_qconfig", "addmm_as_linear", "special_modules", "annotate", "share", "observe",
           "quantized_io", "record_state", "verify_prepared")
PREPARE_QAT = ("trace", "fuse", "assign_qconfig", "addmm_as_linear", "qat_swap", "special_modules", "annotate",
               "share", "observe", "quantized_io", "record_state", "verify_prepared")
REFERENCE = ("quantized_inputs", "to_reference", "quantized_outputs", "bake_parametrizations", "verify_reference")
# convert_fx; lowering passes join this tuple as they land (see passes/lower*.py)
CONVERT = ("quantized_inputs", "to_reference", "quantized_outputs", "bake_parametrizations", "verify_reference",
           "lower", "cleanup", "quantized_io_attach", "verify_lowered", "sign_lowered")


@dataclass
class Context:
    """Everything the passes share for one call of an entry point."""

    qconfig_mapping: Any = None
    backend_config: Any = None
    example_inputs: tuple = ()
    prepare_custom_config: Any = None
    convert_custom_config: Any = None
    fuse_custom_config: Any = None
    is_qat: bool = False
    is_standalone: bool = False
    convert_qconfig_mapping: Any = None
    remove_qconfig: bool = True
    keep_original_weights: bool = False
    state: Any = None  # PreparedState (set by prepare, read by convert)
    share_groups: Any = None  # UnionFind over nodes (set by the share pass)
    timings: dict[str, float] = field(default_factory=dict)

    def modules(self, gm: nn.Module) -> dict[str, nn.Module]:
        return dict(gm.named_modules(remove_duplicate=False))


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    """Register ``fn`` under ``name`` so stages can list it."""

    def deco(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        PASSES[name] = fn
        return fn

    return deco


Hook = Callable[[str, nn.Module, Context], None]


def run(model: nn.Module, stage: tuple[str, ...], ctx: Context, hook: Optional[Hook] = None) -> nn.Module:
    """Run the passes named in ``stage`` in order; ``hook(name, gm, ctx)`` after each."""
    from . import passes  # noqa: F401  (registers the passes)

    with _gc_paused():
        for name in stage:
            if name not in PASSES:
                raise KeyError(f"unknown pass {name!r}; registered: {sorted(PASSES)}")
            start = time.perf_counter()
            model = PASSES[name](model, ctx)
            ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - start
            if hook is not None:
                hook(name, model, ctx)
        if isinstance(model, fx.GraphModule):
            model.recompile()  # passes edit the graph only; the Python code is generated once per stage
    return model


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a stage runs (as it was, afterwards). A stage allocates many
    small objects that stay alive (nodes, modules, tensors), so the collector's full passes re-scan the whole
    heap mid-stage without finding garbage (~15% of a 1600-layer convert_fx); cycles a stage leaves behind are
    collected as usual once it is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def timing_hook(name: str, gm: nn.Module, ctx: Context) -> None:
    """A hook that prints how long each pass took."""
    print(f"[fxquant] {name:<18} {ctx.timings[name] * 1e3:8.1f} ms")


