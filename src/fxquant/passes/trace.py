"""trace: turn the user's module into a GraphModule whose leaves are torch.nn modules.

Before::  MyNet(nn.Module)              After::  GraphModule with call_module nodes for conv, relu, ...

Every node gets ``node.meta["fxquant_scope"] = (module_path, module_type)`` — the module whose forward created it
(used to resolve qconfigs of functions), and, when example inputs are given, ``node.meta["fxquant_value"]``
describing its run-time value (tensor or not, floating or not) so that observers go only where float tensors flow.
A module created while the forward runs (``nn.SiLU()(x)``, Hugging Face's ``ACT2FN[name](x)``) is not a submodule,
and torch.fx refuses it; a stateless one (no parameters or buffers) is adopted instead: it becomes a
submodule of the traced graph named ``_fxquant_unowned_<i>`` (the user's model is left as it was).
A model that cannot be traced raises :class:`TraceFailure` naming the module path, the source line, the likely cause
and the fix. A model torch.fx cannot trace as it comes can be traced by the user (any tracer) and given as a
GraphModule: the modules its graph calls stay leaves.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import traceback
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import fx, nn

from ..pipeline import Context, register_pass

__all__ = ["trace", "QuantizationTracer", "TraceFailure", "ValueInfo", "annotate_values", "ADOPTED_PREFIX",
           "release_adopted", "preserve_python_state"]

ADOPTED_PREFIX = "_fxquant_unowned_"


class TraceFailure(RuntimeError):
    """torch.fx could not trace the model; the message says where and how to fix it."""


def _is_library_module(m: nn.Module) -> bool:
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn") or mod.startswith("fxquant.")) \
        and not isinstance(m, nn.Sequential)


# torch.nn containers traced into (torch.ao keeps them whole, in float): their feed-forward Linear layers are most of
# a transformer's work. Their forward checks sizes in Python (`src.dim() == 3`), so models holding them are traced on
# the example inputs (fxquant.tracing); nn.MultiheadAttention inside stays a leaf.
TRACED_INTO: tuple[type, ...] = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                                 nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class QuantizationTracer(fx.Tracer):
    """A tracer that keeps torch.nn / fxquant modules and user-listed modules as leaves and records scopes."""

    def __init__(self, skipped_names: tuple[str, ...] | list[str] = (), skipped_classes: tuple[type, ...] | list[type] = ()):
        super().__init__()
        self.skipped_names = set(skipped_names)
        self.skipped_classes = tuple(skipped_classes)
        self.path_stack: list[tuple[str, type]] = []
        self.failure_stack: Optional[list[tuple[str, type]]] = None  # the module stack when tracing failed
        self.traced_into: tuple[type, ...] = ()  # torch.nn classes traced into (symbolic_trace: TRACED_INTO)
        self.adopted = 0  # modules created in the forward, adopted as submodules (path_of_module)

    def path_of_module(self, mod: nn.Module) -> str:
        """torch.fx's path of a submodule; a stateless module the forward creates on the fly (not a
        submodule) is adopted under a new name instead of failing (see the module docstring)."""
        try:
            return super().path_of_module(mod)
        except NameError:
            if not _adoptable(mod):
                raise
        name = f"{ADOPTED_PREFIX}{self.adopted}"
        self.adopted += 1
        self.root.add_module(name, mod)  # GraphModule(root, graph) copies it from there; release_adopted removes it
        if self.submodule_paths is not None:
            self.submodule_paths[mod] = name
        self.on_adopt(name, mod)
        return name

    def on_adopt(self, name: str, mod: nn.Module) -> None:
        """Hook for tracers holding a copy of the root."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.skipped_names or (bool(self.skipped_classes)
                                                           and isinstance(m, self.skipped_classes)):
            return True
        return _is_library_module(m) and not isinstance(m, self.traced_into)

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


def _adoptable(mod: nn.Module) -> bool:
    """A module with no parameters or buffers: creating it in the forward is the same as holding one (one with
    parameters would get fresh random ones on every call: tracing it would freeze one draw, so it stays an error)."""
    return next(iter(mod.parameters()), None) is None and next(iter(mod.buffers()), None) is None


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


@contextlib.contextmanager
def preserve_python_state(model: nn.Module) -> Iterator[None]:
    """Undo what tracing writes into the model's plain Python attributes.

    A forward that caches into its module (LeViT's ``self.attention_bias_cache[device] = ...`` in eval mode) stores a
    torch.fx Proxy there while being traced: the next trace, or a plain call, then reads a value of a dead graph.
    Attributes (other than nn.Module's own bookkeeping) are put back as they were, and dict / list / set contents
    too."""
    saved = []
    for mod in model.modules():
        state = {k: v for k, v in mod.__dict__.items() if k not in _MODULE_INTERNALS}
        contents = {k: (type(v)(v) if type(v) in (dict, list, set) else None) for k, v in state.items()}
        saved.append((mod, state, contents))
    try:
        yield
    finally:
        for mod, state, contents in saved:
            for key in [k for k in mod.__dict__ if k not in _MODULE_INTERNALS and k not in state]:
                del mod.__dict__[key]
            for key, value in state.items():
                mod.__dict__[key] = value
                kept = contents[key]
                if kept is None or (len(value) == len(kept) and all(
                        a is b for a, b in zip(_items(value), _items(kept)))):
                    continue
                value.clear()
                if isinstance(value, list):
                    value.extend(kept)
                else:
                    value.update(kept)


def _items(c: Any) -> list[Any]:
    return [x for kv in c.items() for x in kv] if isinstance(c, dict) else list(c)


def release_adopted(model: nn.Module) -> None:
    """Remove the modules a tracer adopted from the user's ``model`` (the traced GraphModule keeps them)."""
    for name in [n for n in model._modules if n.startswith(ADOPTED_PREFIX)]:
        del model._modules[name]


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost frame of the traceback that is not inside torch or fxquant."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        f = frame.filename.replace("\\", "/")
        if "/torch/" not in f and "/fxquant/" not in f:
            return frame
    return None


# what a torch.fx error means, by a fragment of its message (the first fragment found wins)
_WHY: tuple[tuple[str, str], ...] = (
    ("co_varnames is too small", "torch.fx cannot bind the inputs of a forward wrapped by a decorator that takes "
                                 "*args / **kwargs"),
    ("inputs to control flow", "Python control flow (if / while / assert / bool()) depends on a traced value: a "
                               "tensor's data, or its shape or dtype compared in Python"),
    ("cannot be iterated", "a traced value is unpacked or iterated in Python (`*x.shape`, `for t in x`, f(*x))"),
    ("slice indices must be integers", "a traced value (usually a size such as `x.shape[1]`) is used where Python "
                                       "needs a plain int (slicing, range(), indexing a list)"),
    ("__index__", "a traced value (usually a size such as `x.shape[1]`) is used where Python needs a plain int"),
    ("does not support item assignment", "a traced value is assigned into like a dict or list"),
    ("argument of type", "a module or function gets an argument a graph cannot hold (an object of a custom class, "
                         "e.g. torchvision's ImageList): graph arguments are tensors, numbers, strings, dtypes and "
                         "lists / tuples / dicts of them"),
)

_LEAF_ARGUMENT_FIX = ("Fix: quantize the part of the model that takes and returns plain tensors (e.g. a detector's "
                      "backbone: prepare_fx(model.backbone, ...), then put the converted backbone back) and keep "
                      "the rest in Python")


def _misbound_root_forward(root: nn.Module) -> str:
    """torch.fx binds the root's inputs by the innermost signature of a decorated forward and calls the wrapper with
    them positionally: wrong when that signature has *args, **kwargs or keyword-only parameters. Names it, or ''."""
    fwd = getattr(type(root), "forward", None)
    inner = inspect.unwrap(fwd) if callable(fwd) else fwd
    code = getattr(inner, "__code__", None)
    if inner is fwd or code is None:
        return ""
    if not (code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS) or code.co_kwonlyargcount):
        return ""
    wrapper = getattr(fwd, "__code__", None)
    where = f"{getattr(fwd, '__globals__', {}).get('__name__', '?')}.{getattr(wrapper, 'co_qualname', '?')}"
    return (f"{type(root).__name__}.forward is wrapped by a decorator ({where}), and torch.fx passes the inputs of "
            f"a decorated forward with *args / **kwargs to the wrapper wrongly")


def _fix(path: str, cls: type, decorated: bool) -> str:
    if path:
        return (f"Fix: mark it non-traceable, e.g. PrepareCustomConfig().set_non_traceable_module_names([{path!r}]) "
                f"or .set_non_traceable_module_classes([{cls.__name__}]) — it then runs in float, unquantized")
    if decorated:
        return ("Fix: wrap the model in a module whose forward names its inputs, e.g. `def forward(self, x): "
                "return self.model(x)`, and prepare the wrapper")
    return ("Fix: make the top-level forward traceable (no Python control flow on traced values), or move the "
            "untraceable part into a submodule and mark it non-traceable")


def _explain_failure(exc: Exception, tracer: QuantizationTracer, root: nn.Module) -> TraceFailure:
    stack = tracer.failure_stack or tracer.path_stack
    path, cls = stack[-1] if stack else ("", type(root))
    frame = _user_frame(exc)
    where = ""
    if frame is not None:
        line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        where = f" at {frame.filename}:{frame.lineno}: `{line}`"
    decorated = "" if path or getattr(tracer, "binds_decorated_forward", False) else _misbound_root_forward(root)
    why = decorated or next((why for fragment, why in _WHY if fragment in str(exc)), "")
    alt = ("; or trace the model yourself (torch.fx.Tracer with concrete_args, custom leaf modules, a library's "
           "own FX tracer) and give prepare_fx the GraphModule: modules it calls stay leaves.")
    leaf = bool(path) and tracer.is_leaf_module(_submodule(root, path), path)
    fix = _LEAF_ARGUMENT_FIX if leaf or "argument of type" in str(exc) else _fix(path, cls, bool(decorated))
    return TraceFailure(f"torch.fx cannot trace module '{path or '<root>'}' ({cls.__name__}){where}: "
                        f"{type(exc).__name__}: {exc}\n" + (f"Why: {why}.\n" if why else "") + fix + alt)


def _submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:  # an adopted module, already released
        return root


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


def _graph_leaves(model: nn.Module) -> list[str]:
    """The modules a given GraphModule calls: they stay leaves, whatever tracer made it (custom leaf modules)."""
    if not isinstance(model, fx.GraphModule):
        return []
    return [str(n.target) for n in model.graph.nodes if n.op == "call_module"]


def symbolic_trace(model: nn.Module, ctx: Context) -> fx.GraphModule:
    """Trace ``model`` with :class:`QuantizationTracer`; where torch.fx fails and example inputs are given, again
    with :class:`fxquant.tracing.ConcreteTracer` (sizes the code needs as Python values fixed to the example's,
    with a warning); clear errors on failure. The containers of :data:`TRACED_INTO` are traced into; where that
    fails they are kept whole (in float, with a warning), as torch.ao keeps them."""
    names, classes = _custom_config_lists(ctx)
    names += _graph_leaves(model)
    containers = sorted({type(m).__name__ for m in model.modules() if isinstance(m, TRACED_INTO)}) \
        if not isinstance(model, fx.GraphModule) else []
    try:
        gm, tracer = _trace(model, ctx, names, classes, TRACED_INTO)
    except Exception as exc:
        if not containers:
            raise
        gm, tracer = _trace(model, ctx, names, classes, ())
        why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        warnings.warn(f"fxquant: could not trace into {', '.join(containers)} ({why}); they run whole, in float, "
                      f"as in torch.ao", stacklevel=6)
    _fold_parameter_metadata(gm)
    _resolve_string_annotations(gm, model)
    for node in gm.graph.nodes:
        node.meta["fxquant_scope"] = tracer.node_name_to_scope.get(node.name, ("", type(model)))
    return gm


def _trace(model: nn.Module, ctx: Context, names: list[str], classes: list[type],
           traced_into: tuple[type, ...]) -> tuple[fx.GraphModule, QuantizationTracer]:
    tracer = QuantizationTracer(names, classes)
    tracer.traced_into = traced_into
    # a GraphModule reads buffers as explicit get_attr nodes (`self.ids[:, :n]`): keep them nodes when re-tracing
    tracer.proxy_buffer_attributes = isinstance(model, fx.GraphModule)
    own = set(model.__dict__) | set(model._buffers) | set(model._parameters) | set(model._modules)
    try:
        try:
            with preserve_python_state(model):  # (undone before a second trace on the example inputs, too)
                return fx.GraphModule(model, tracer.trace(model), type(model).__name__), tracer
        except Exception as exc:  # torch.fx raises many types; all are reported the same way
            if not ctx.example_inputs:
                raise _explain_failure(exc, tracer, model) from exc
            return _trace_on_inputs(model, names, classes, tuple(ctx.example_inputs), exc, traced_into)
    finally:  # torch.fx stores tensor constants of the forward on the traced root: the user's model stays as it was
        release_adopted(model)
        added = (set(model.__dict__) | set(model._buffers) | set(model._parameters)) - own
        for name in added:
            if name.startswith("_tensor_constant"):
                delattr(model, name)


def _resolve_string_annotations(gm: fx.GraphModule, model: nn.Module) -> None:
    """Input / output annotations that are strings (a model file with ``from __future__ import annotations``)
    become the types they name, or are dropped: torch.fx keeps them as strings, and a GraphModule holding one
    cannot be pickled (``torch.save(model)`` fails with "'str' object has no attribute '__name__'")."""
    annotated = [n for n in gm.graph.nodes if n.op in ("placeholder", "output") and isinstance(n.type, str)]
    if not annotated:
        return
    try:
        hints = typing.get_type_hints(type(model).forward)
    except Exception:  # noqa: BLE001 - names that do not resolve: the annotation is only dropped
        hints = {}
    for node in annotated:
        resolved = hints.get("return" if node.op == "output" else str(node.target).lstrip("*"))
        node.type = resolved if isinstance(resolved, type) else None


_PARAM_METADATA_ATTRS = frozenset({"shape", "dtype", "ndim", "device"})
_PARAM_METADATA_METHODS = frozenset({"size", "dim", "numel"})


def _parameter_metadata(user: fx.Node, param: nn.Parameter) -> tuple[bool, Any]:
    """(True, value) when ``user`` reads only metadata of ``param`` (its first argument) with constant arguments."""
    rest = user.args[1:]
    if any(isinstance(a, fx.Node) for a in rest) or user.kwargs:
        return False, None
    if user.op == "call_function" and user.target is getattr and rest and rest[0] in _PARAM_METADATA_ATTRS:
        return True, getattr(param, rest[0])
    if user.op == "call_method" and user.target in _PARAM_METADATA_METHODS:
        return True, getattr(param, str(user.target))(*rest)
    return False, None


def _fold_parameter_metadata(gm: fx.GraphModule) -> None:
    """``self.conv.weight.shape[0]`` / ``.dtype`` / ``.size(1)``: constants, not reads of the weight at run time.

    A parameter's shape and dtype do not change, and convert swaps ``conv`` for a module that may hold its weight
    under another name: a get_attr left for metadata would break the converted graph. Unused get_attr go too.
    """
    params = dict(gm.named_parameters(remove_duplicate=False))
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or str(node.target) not in params:
            continue
        for user in list(node.users):
            folds, value = _parameter_metadata(user, params[str(node.target)])
            if not folds:
                continue
            for consumer in list(user.users):
                consumer.args = fx.node.map_arg(consumer.args, lambda n: value if n is user else n)
                consumer.kwargs = fx.node.map_arg(consumer.kwargs, lambda n: value if n is user else n)
            gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)


def _trace_on_inputs(model: nn.Module, names: list[str], classes: list[type], example_inputs: tuple,
                     first: Exception, traced_into: tuple[type, ...] = ()) -> tuple[fx.GraphModule, QuantizationTracer]:
    from ..tracing import ConcreteTracer, concrete_trace

    tracer = ConcreteTracer(example_inputs, names, classes)
    tracer.traced_into = traced_into
    try:
        gm = concrete_trace(tracer, model)
    except Exception as exc:  # still untraceable: report where the example-driven trace stopped
        raise _explain_failure(exc, tracer, model) from exc
    warnings.warn(f"fxquant: torch.fx cannot trace {type(model).__name__} as it is ({type(first).__name__}: "
                  f"{str(first).splitlines()[0][:200]}); traced it on example_inputs instead, where the code needs "
                  f"sizes as Python values they are fixed to the example's (checked at run time). See "
                  f"fxquant.tracing.", stacklevel=7)
    return gm, tracer


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
    """Trace ``model``. A GraphModule (traced by any tracer) is re-traced through its generated code; the modules
    it calls stay leaves."""
    gm = symbolic_trace(model, ctx)
    _copy_preserved_attributes(model, gm, ctx)
    annotate_values(gm, tuple(ctx.example_inputs or ()))
    return gm


def _copy_preserved_attributes(src: nn.Module, gm: fx.GraphModule, ctx: Context) -> None:
    cfg = ctx.prepare_custom_config if ctx.prepare_custom_config is not None else ctx.fuse_custom_config
    for attr in (getattr(cfg, "preserved_attributes", []) or []) if cfg is not None else []:
        if hasattr(src, attr):
            setattr(gm, attr, getattr(src, attr))
