"""trace: turn the user's module into a GraphModule whose leaves are torch.nn modules.

Before::  MyNet(nn.Module)              After::  GraphModule with call_module nodes for conv, relu, ...

Every node gets ``node.meta["fxquant_scope"] = (module_path, module_type)`` — the module whose forward created it
(used to resolve qconfigs of functions), and, when example inputs are given, ``node.meta["fxquant_value"]``
describing its run-time value (tensor or not, floating or not) so that observers go only where float tensors flow.
A model that cannot be traced raises :class:`TraceFailure` naming the module path, the source line and the fix.
"""
from __future__ import annotations

import linecache
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx, nn

from ..pipeline import Context, register_pass

__all__ = ["trace", "QuantizationTracer", "TraceFailure", "ValueInfo", "annotate_values"]


class TraceFailure(RuntimeError):
    """torch.fx could not trace the model; the message says where and how to fix it."""


def _is_library_module(m: nn.Module) -> bool:
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn") or mod.startswith("fxquant.")) \
        and not isinstance(m, nn.Sequential)


class QuantizationTracer(fx.Tracer):
    """A tracer that keeps torch.nn / fxquant modules and user-listed modules as leaves and records scopes."""

    def __init__(self, skipped_names: tuple[str, ...] | list[str] = (), skipped_classes: tuple[type, ...] | list[type] = ()):
        super().__init__()
        self.skipped_names = set(skipped_names)
        self.skipped_classes = tuple(skipped_classes)
        self.path_stack: list[tuple[str, type]] = []
        self.failure_stack: Optional[list[tuple[str, type]]] = None  # the module stack when tracing failed

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (_is_library_module(m) or module_qualified_name in self.skipped_names
                or (bool(self.skipped_classes) and isinstance(m, self.skipped_classes)))

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        self.path_stack.append((path, type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failure_stack is None:
                self.failure_stack = list(self.path_stack)
            raise
        finally:
            self.path_stack.pop()


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost frame of the traceback that is not inside torch or fxquant."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        f = frame.filename.replace("\\", "/")
        if "/torch/" not in f and "/fxquant/" not in f:
            return frame
    return None


def _explain_failure(exc: Exception, tracer: QuantizationTracer, root: nn.Module) -> TraceFailure:
    stack = tracer.failure_stack or tracer.path_stack
    path, cls = stack[-1] if stack else ("", type(root))
    frame = _user_frame(exc)
    where = ""
    if frame is not None:
        line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        where = f" at {frame.filename}:{frame.lineno}: `{line}`"
    name = path or "<root>"
    fix = (f"Fix: mark it non-traceable, e.g. PrepareCustomConfig().set_non_traceable_module_names([{path!r}]) "
           f"or .set_non_traceable_module_classes([{cls.__name__}]) — it then runs in float, unquantized."
           if path else "Fix: make the top-level forward traceable (no data-dependent control flow on tensors), "
                        "or move the untraceable part into a submodule and mark it non-traceable.")
    return TraceFailure(f"torch.fx cannot trace module '{name}' ({cls.__name__}){where}: "
                        f"{type(exc).__name__}: {exc}\n{fix}")


def _custom_config_lists(ctx: Context) -> tuple[list[str], list[type]]:
    cfg = ctx.prepare_custom_config
    if cfg is None:
        return [], []
    names = list(getattr(cfg, "non_traceable_module_names", []) or [])
    names += list((getattr(cfg, "standalone_module_names", {}) or {}).keys())
    classes = list(getattr(cfg, "non_traceable_module_classes", []) or [])
    classes += list((getattr(cfg, "standalone_module_classes", {}) or {}).keys())
    for per_type in (getattr(cfg, "float_to_observed_mapping", {}) or {}).values():
        classes += list(per_type.keys())
    return names, classes


def symbolic_trace(model: nn.Module, ctx: Context) -> fx.GraphModule:
    """Trace ``model`` with :class:`QuantizationTracer`; clear errors on failure."""
    names, classes = _custom_config_lists(ctx)
    tracer = QuantizationTracer(names, classes)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises many types; all are reported the same way
        raise _explain_failure(exc, tracer, model) from exc
    gm = fx.GraphModule(model, graph, type(model).__name__)
    for node in gm.graph.nodes:
        node.meta["fxquant_scope"] = tracer.node_name_to_scope.get(node.name, ("", type(model)))
    return gm


@dataclass(frozen=True)
class ValueInfo:
    """What a node produced when the model ran on the example inputs."""

    is_tensor: bool
    is_float: bool
    shape: Optional[tuple[int, ...]] = None


def _info(value: Any) -> ValueInfo:
    if isinstance(value, torch.Tensor):
        return ValueInfo(True, value.is_floating_point(), tuple(value.shape))
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return ValueInfo(False, False)
    return ValueInfo(False, False)


class _Recorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["fxquant_value"] = _info(result)
        return result


def annotate_values(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``gm`` once on ``example_inputs`` and record each node's :class:`ValueInfo`.

    Runs without gradients and with every module in eval mode (restored afterwards), so batch-norm statistics
    and the like are not touched.
    """
    if not example_inputs:
        return
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with torch.no_grad():
            _Recorder(gm).run(*example_inputs)
    except Exception as exc:  # best effort: fall back to static reasoning
        for node in gm.graph.nodes:
            node.meta.pop("fxquant_value", None)
        warnings.warn(f"fxquant: running the traced model on example_inputs failed ({type(exc).__name__}: "
                      f"{exc}); observer placement falls back to static rules. Check example_inputs.",
                      stacklevel=3)
    finally:
        for m, mode in modes:
            m.training = mode


@register_pass("trace")
def trace(model: nn.Module, ctx: Context) -> fx.GraphModule:
    """Trace ``model`` (a GraphModule is re-traced so its leaves follow fxquant's rules)."""
    gm = symbolic_trace(model, ctx)
    _copy_preserved_attributes(model, gm, ctx)
    annotate_values(gm, tuple(ctx.example_inputs or ()))
    return gm


def _copy_preserved_attributes(src: nn.Module, gm: fx.GraphModule, ctx: Context) -> None:
    cfg = ctx.prepare_custom_config if ctx.prepare_custom_config is not None else ctx.fuse_custom_config
    for attr in (getattr(cfg, "preserved_attributes", []) or []) if cfg is not None else []:
        if hasattr(src, attr):
            setattr(gm, attr, getattr(src, attr))
