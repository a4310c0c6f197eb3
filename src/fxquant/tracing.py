"""Trace a model that plain torch.fx cannot, by running it on example inputs while tracing.

torch.fx keeps every value symbolic, so Python code that needs a real value fails: ``seq = x.shape[1];
ids[:, :seq]`` on a real buffer, ``(*x.shape[:-1], heads, -1)``, ``if x.dtype != torch.float32``, ``len(x)``,
a decorated ``forward(self, *args, **kwargs)`` (Hugging Face models), ... :func:`trace_with_inputs` traces with a
tracer that also computes every value on the example inputs, so that

* ``x.dtype``, ``x.device``, ``x.ndim`` are the example's (constants in the graph);
* a value computed from sizes only (``x.shape[1] + 1``, ``torch.arange(n) < 4``, ...) can be used where Python
  needs a plain value — ``bool()``, ``int()``, ``float()``, a slice bound — and then takes the example's value: the
  graph is *specialised* to the example's sizes there (it stays symbolic everywhere else);
* ``len()``, iteration and ``*unpacking`` of any value use the example's length (``for t in x.split(8)``);
* control flow on tensor *data* (``if x.sum() > 0``) is still refused, with fxquant's error message.

Before::  forward(self, input_ids, attention_mask=None, **kwargs)   (torch.fx: TraceError)
After::   GraphModule forward(self, input_ids): the ops the example ran, modules of torch.nn kept as calls

:func:`fxquant.prepare_fx` falls back to this tracer (with a warning) when plain torch.fx fails; where a size was
fixed, a ``torch._assert`` guard in the graph says so at run time if other sizes come. The model runs once while
tracing, on a deep copy, in its current mode (train / eval): its state is not touched.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import traceback
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.proxy import Attribute
from torch.utils import _pytree as pytree

from .passes.trace import QuantizationTracer, _explain_failure, preserve_python_state, release_adopted

__all__ = ["trace_with_inputs", "concrete_trace", "ConcreteTracer", "GraphCodeTracer"]

# tensor attributes that are constants of a traced graph: returned as the example's values, never recorded (the
# methods among them, ``x.is_floating_point()``, as the example's bound method)
_STATIC_ATTRS = frozenset({"dtype", "device", "ndim", "is_cuda", "is_sparse", "is_quantized", "layout",
                           "requires_grad", "is_floating_point", "is_complex", "is_signed", "element_size",
                           "is_nested", "is_cpu", "is_meta", "is_mkldnn"})
# ops whose result depends on sizes only, never on tensor data
_SIZE_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement"})
_SIZE_ATTRS = frozenset({"shape"})


class _Concrete:
    """Python conversions of a proxy, answered from its example value when that depends on sizes only."""

    tracer: "ConcreteTracer"

    def __len__(self) -> int:  # a length is a size (dim 0, or how many tensors an op returned): never data
        return len(self.tracer.value_of(self))

    def __index__(self) -> int:
        return operator.index(self.tracer.python_value(self, "an int (slice / index)"))

    def __int__(self) -> int:
        return int(self.tracer.python_value(self, "int()"))

    def __float__(self) -> float:
        return float(self.tracer.python_value(self, "float()"))


class _CodeProxy(fx.Proxy):
    """A proxy whose in-place item assignment is a node (`y[:, 1:] = x[:, :-1]`) and whose protocol probes
    (`__cuda_array_interface__`, ...) are not ops; :class:`GraphCodeTracer` re-traces generated code with it."""

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") and k.endswith("__"):
            raise AttributeError(k)
        return super().__getattr__(k)

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class ConcreteProxy(_Concrete, _CodeProxy):
    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") and k.endswith("__"):
            raise AttributeError(k)
        if k in _STATIC_ATTRS:
            return getattr(self.tracer.value_of(self), k)
        return ConcreteAttribute(self, k)


class ConcreteAttribute(_Concrete, Attribute):
    pass


# torch functions that cannot take traced values as torch.fx expects (see ConcreteTracer.trace)
_RECORDED = ("tensor", "ones", "zeros", "empty", "rand", "randn", "full", "arange")
# torch.nn.functional helpers that inspect their tensor arguments with isinstance / Python bools (nn.Transformer*)
_RECORDED_F = ("_canonical_mask",)


def _holds_proxy(data: Any) -> bool:
    return any(isinstance(x, fx.Proxy) for x in pytree.tree_leaves(data))


def _untraced() -> Any:
    """A context in which module calls and fx.wrap-ped functions run for real (torch.fx's patches lifted)."""
    revert = getattr(fx._symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


def _user_frame_now() -> Optional[traceback.FrameSummary]:
    """The innermost frame of the current stack outside torch and fxquant: the model's source line."""
    for frame in reversed(traceback.extract_stack()):
        f = frame.filename.replace("\\", "/")
        if "/torch/" not in f and "/fxquant/" not in f:
            return frame
    return None


def _size_query(kind: str, target: Any, args: tuple) -> bool:
    if kind == "call_method":
        return target in _SIZE_METHODS
    return kind == "call_function" and target is getattr and len(args) > 1 and args[1] in _SIZE_ATTRS


class _RecordsFactories:
    """Tracing in which the torch functions of ``_RECORDED`` become graph calls when given traced values:
    torch.tensor reads its data as a Python sequence, and ``torch.ones(b, n)`` parses sizes given one by one
    before any proxy can intercept it."""

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        originals = [(torch, name, getattr(torch, name)) for name in _RECORDED]
        originals += [(F, name, getattr(F, name)) for name in _RECORDED_F if hasattr(F, name)]
        for owner, name, fn in originals:
            setattr(owner, name, self._recording(fn))
        none_or_dtype = getattr(F, "_none_or_dtype", None)
        if none_or_dtype is not None:  # nn.Transformer*: `F._none_or_dtype(mask)` checks isinstance(mask, Tensor)
            originals.append((F, "_none_or_dtype", none_or_dtype))
            F._none_or_dtype = lambda x: x.dtype if isinstance(x, fx.Proxy) else none_or_dtype(x)
        try:
            return super().trace(root, concrete_args)  # type: ignore[misc,no-any-return]
        finally:
            for owner, name, fn in originals:
                setattr(owner, name, fn)

    def _recording(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if _holds_proxy((args, kwargs)):
                return self.create_proxy("call_function", fn, args, kwargs)  # type: ignore[attr-defined]
            return fn(*args, **kwargs)

        return call


class GraphCodeTracer(_RecordsFactories, QuantizationTracer):
    """Re-traces the generated code of a graph :class:`ConcreteTracer` made (what ``torch.load`` does to rebuild a
    pickled GraphModule): that code has no control flow left, only calls such as ``torch.ones(size_1, 4)`` and
    item assignments."""

    def __init__(self, skipped_names: Sequence[str] = (), skipped_classes: Sequence[type] = ()):
        super().__init__(tuple(skipped_names), tuple(skipped_classes))
        self.proxy_buffer_attributes = True  # the code slices buffers with traced sizes: `self.ids[:, :size_1]`

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _CodeProxy(node, self)


class ConcreteTracer(_RecordsFactories, QuantizationTracer):
    """fxquant's QuantizationTracer that also runs every traced op on the example inputs (see module docstring)."""

    binds_decorated_forward = True  # calls the root's forward normally (see create_args_for_root)

    def __init__(self, example_inputs: tuple, skipped_names: Sequence[str] = (),
                 skipped_classes: Sequence[type] = ()):
        super().__init__(tuple(skipped_names), tuple(skipped_classes))
        self.proxy_buffer_attributes = True  # `self.ids[:, :n].expand(b, n)` stays symbolic (a real tensor cannot)
        self.example_inputs = example_inputs
        self.values: dict[fx.Node, Any] = {}
        self.data_dependent: dict[fx.Node, bool] = {}
        self.shadow: Optional[nn.Module] = None  # a copy of the root that computes the values (no side effects)
        self._placeholder_values: list[Any] = []

    # -- the example values ------------------------------------------------------------------------------------
    def value_of(self, a: Any) -> Any:
        """The example value of a proxy / attribute / structure holding them."""
        def one(x: Any) -> Any:
            if isinstance(x, Attribute) and x._node is None:
                return getattr(self.value_of(x.root), x.attr)
            if isinstance(x, fx.Proxy):
                return self.values[x.node]
            return x
        return pytree.tree_map(one, a, is_leaf=lambda x: isinstance(x, fx.Proxy))

    def _depends_on_data(self, a: Any) -> bool:
        found = [False]

        def one(x: Any) -> Any:
            if isinstance(x, Attribute) and x._node is None:
                found[0] |= x.attr not in _SIZE_ATTRS and self._depends_on_data(x.root)
            elif isinstance(x, fx.Proxy):
                found[0] |= self.data_dependent.get(x.node, True)
            return x
        pytree.tree_map(one, a, is_leaf=lambda x: isinstance(x, fx.Proxy))
        return found[0]

    def python_value(self, proxy: Any, use: str) -> Any:
        """The example value of ``proxy`` for a Python conversion, refused when it depends on tensor data. A size
        used this way is specialised: a guard in the graph checks it at run time."""
        if self._depends_on_data(proxy):
            raise fx.proxy.TraceError(
                f"symbolically traced variables cannot be used as inputs to control flow: {use} of a value "
                f"computed from tensor data (only values computed from sizes take the example's value)")
        value = self.value_of(proxy)
        if isinstance(value, (bool, int, float)):
            self._guard(proxy, value, use)
        return value

    def _guard(self, proxy: Any, value: Any, use: str) -> None:
        same = self.create_proxy("call_function", operator.eq, (proxy, value), {})
        frame = _user_frame_now()
        where = f" at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`" if frame is not None else ""
        msg = (f"fxquant traced this model on its example inputs and fixed {proxy.node.name} = {value!r} (used as "
               f"{use}{where}); give inputs of the example's sizes, or trace again with such inputs")
        self.create_proxy("call_function", torch._assert, (same, msg), {})

    # -- fx.Tracer hooks ---------------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def on_adopt(self, name: str, mod: nn.Module) -> None:
        if self.shadow is not None:  # the copy that computes the values calls it by the same path
            self.shadow.add_module(name, mod)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str] = None,
                     type_expr: Optional[Any] = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        # parameters too become ConcreteProxy (not torch.fx's ParameterProxy): `.dtype` and sizes answer from values
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, None)
        if kind != "output":
            self.values[proxy.node] = self._run(kind, target, args, kwargs)
            self.data_dependent[proxy.node] = kind in ("placeholder", "get_attr") or (
                not _size_query(kind, target, args) and self._depends_on_data((args, kwargs)))
        return proxy

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self._placeholder_values.pop(0) if self._placeholder_values else None
        a, kw = self.value_of(args), self.value_of(kwargs)
        with torch.no_grad(), _untraced():
            if kind == "get_attr":
                value: Any = self.shadow
                for part in str(target).split("."):
                    value = getattr(value, part)
                return value
            if kind == "call_function":
                return target(*a, **kw)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **kw)
            return self.shadow.get_submodule(str(target))(*a, **kw)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.python_value(obj, "bool() (an if / while / and / or)"))

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:  # `for t in x.split(n)`, `(*x.shape, -1)`: needs a length only
        return iter([obj[i] for i in range(len(self.value_of(obj)))])

    def keys(self, obj: fx.Proxy) -> Any:
        return self.value_of(obj).keys()

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> tuple[Any, list]:
        """One placeholder per example input, named like the forward's parameters; the other parameters keep their
        defaults. The forward is called normally, so a decorated ``forward(*args, **kwargs)`` binds correctly."""
        params = [p for p in inspect.signature(inspect.unwrap(root_fn)).parameters.values()][1:]
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._placeholder_values = list(self.example_inputs)
        names = [positional[i] if i < len(positional) else f"input_{i}" for i in range(len(self.example_inputs))]
        placeholders = [self.create_proxy("placeholder", n, (), {}) for n in names]
        return root_fn, [self.root, *placeholders]


def concrete_trace(tracer: ConcreteTracer, model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` in its current mode; values are computed on a copy, so the model's state is untouched."""
    tracer.shadow = copy.deepcopy(model)
    try:
        with preserve_python_state(model):  # (the GraphModule copies torch.fx's constants off the root first)
            graph = tracer.trace(model)
            # torch.load rebuilds a pickled GraphModule by re-tracing its generated code with a subclass of the
            # recorded tracer class, constructed without arguments
            graph._tracer_cls = GraphCodeTracer
            return fx.GraphModule(model, graph, type(model).__name__)
    finally:
        tracer.shadow = None
        release_adopted(model)


def trace_with_inputs(model: nn.Module, example_inputs: tuple, non_traceable_module_names: Sequence[str] = (),
                      non_traceable_module_classes: Sequence[type] = ()) -> fx.GraphModule:
    """Trace ``model`` on ``example_inputs`` with :class:`ConcreteTracer` (see the module docstring).

    prepare_fx does this by itself when plain torch.fx tracing fails; call it to look at the graph first or to
    trace once for several prepares. Non-traceable modules (names or classes) stay calls, as in
    PrepareCustomConfig. Raises :class:`~fxquant.passes.trace.TraceFailure` with where, why and the fix.
    """
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}")
    tracer = ConcreteTracer(example_inputs, non_traceable_module_names, non_traceable_module_classes)
    try:
        return concrete_trace(tracer, model)
    except Exception as exc:  # torch.fx raises many types; all are reported the same way
        raise _explain_failure(exc, tracer, model) from exc

