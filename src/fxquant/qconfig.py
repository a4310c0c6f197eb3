"""``QConfig``: how to observe a layer's activations and weights, and the named qconfigs of torch.ao.

Mirrors ``torch.ao.quantization.qconfig``: same names, same observer constructors and arguments (with plain dtypes,
``torch.uint8`` where torch.ao says ``quint8``). The qconfigs built from fake quants (``default_qat_qconfig``, ...)
are created on first access, so this module does not import :mod:`fxquant.fake_quantize` until they are needed.
"""
from __future__ import annotations

import functools
import warnings
from collections import namedtuple
from typing import Any, Callable, Optional

import torch

from fxquant import observer as obs
from fxquant._dtypes import normalize_dtype
from fxquant._partial import is_observer_constructor

__all__ = [
    "QConfig", "QConfigDynamic", "QConfigAny", "qconfig_equals", "get_default_qconfig", "get_default_qat_qconfig",
    "get_default_qconfig_dict", "get_default_qat_qconfig_dict", "check_qconfig_for_module", "is_reuse_input_qconfig",
    "activation_is_memoryless", "qconfig_on_module_device",
    "default_qconfig", "default_debug_qconfig", "default_per_channel_qconfig", "default_dynamic_qconfig",
    "float16_dynamic_qconfig", "float16_static_qconfig", "per_channel_dynamic_qconfig",
    "float_qparams_weight_only_qconfig", "float_qparams_weight_only_qconfig_4bit", "default_quint8_weight_qconfig",
    "default_qat_qconfig", "default_dynamic_qat_qconfig", "default_weight_only_qconfig",
    "default_activation_only_qconfig", "default_qat_qconfig_v2", "default_reuse_input_qconfig",
    "default_symmetric_qnnpack_qconfig", "default_per_channel_symmetric_qnnpack_qconfig",
    "default_symmetric_qnnpack_qat_qconfig", "default_per_channel_symmetric_qnnpack_qat_qconfig",
    "default_embedding_qat_qconfig", "default_embedding_qat_qconfig_4bit",
]

SUPPORTED_BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


def _built_class(ctor: Any) -> Any:
    """The class a constructor builds (through ``with_args`` wrappers)."""
    partial = getattr(ctor, "p", None)
    return partial.func if isinstance(partial, functools.partial) else ctor


def _torch_ao_origin(ctor: Any) -> bool:
    """True when ``ctor`` (or the observer a fake-quant constructor wraps) is a torch.ao class."""
    if (getattr(_built_class(ctor), "__module__", "") or "").startswith("torch.ao"):
        return True
    partial = getattr(ctor, "p", None)
    inner = partial.keywords.get("observer") if isinstance(partial, functools.partial) else None
    return inner is not None and _torch_ao_origin(inner)


def _check_constructor(value: Any, field: str, owner: str) -> None:
    if value is None:
        return
    if isinstance(value, torch.nn.Module):
        raise ValueError(f"{owner} received an observer instance ({type(value).__name__}) as {field}; pass the "
                         f"class or a constructor instead, e.g. {type(value).__name__}.with_args(...)")
    if _torch_ao_origin(value):
        raise TypeError(f"{owner}: {field}={value!r} is a torch.ao observer / fake quant; use the fxquant class of "
                        "the same name (fxquant.observer, fxquant.fake_quantize) or fxquant.migrate.from_torch_ao")
    if not (is_observer_constructor(value) or callable(value)):
        raise TypeError(f"{owner}: {field} must be an observer class, a Cls.with_args(...) constructor, a callable "
                        f"returning an observer, or None; got {type(value).__name__}: {value!r}")


class QConfig(namedtuple("QConfig", ["activation", "weight"])):
    """How to quantize a layer: observer (or fake quant) *constructors* for its activations and its weight.

    Each field is a class (``MinMaxObserver``), a ``Cls.with_args(...)`` constructor, or ``None``; prepare calls
    it once per observed tensor. Instances are rejected (``ValueError``), as are torch.ao observers (``TypeError``;
    convert them with :func:`fxquant.migrate.from_torch_ao`)::

        QConfig(activation=MinMaxObserver.with_args(dtype=torch.uint8),
                weight=MinMaxObserver.with_args(dtype=torch.int8, qscheme=torch.per_tensor_symmetric))
    """

    __slots__ = ()

    def __new__(cls, activation: Any, weight: Any) -> QConfig:
        _check_constructor(activation, "activation", cls.__name__)
        _check_constructor(weight, "weight", cls.__name__)
        return super().__new__(cls, activation, weight)


class QConfigDynamic(namedtuple("QConfigDynamic", ["activation", "weight"])):
    """Deprecated (as in torch.ao): use :class:`QConfig` with a dynamic activation observer instead."""

    __slots__ = ()

    def __new__(cls, activation: Any = torch.nn.Identity, weight: Any = torch.nn.Identity) -> QConfigDynamic:
        warnings.warn("QConfigDynamic is deprecated, please use QConfig instead", FutureWarning, stacklevel=2)
        _check_constructor(activation, "activation", cls.__name__)
        _check_constructor(weight, "weight", cls.__name__)
        return super().__new__(cls, activation, weight)


QConfigAny = Optional[QConfig]


# ------------------------------------------------------------------------------------------------ equality
def _normalized(value: Any) -> Any:
    return normalize_dtype(value) if isinstance(value, torch.dtype) else value


def _constructor_equals(a: Any, b: Any) -> bool:
    """Same class, positional args and keyword args (dtypes normalised; ``observer=`` compared recursively).

    Arguments supplied through ``with_callable_args`` are ignored, as in torch.ao.
    """
    pa, pb = getattr(a, "p", None), getattr(b, "p", None)
    if not (isinstance(pa, functools.partial) and isinstance(pb, functools.partial)):
        return bool(a == b)
    if pa.func != pb.func or pa.args != pb.args or set(pa.keywords) != set(pb.keywords):
        return False
    for name, va in pa.keywords.items():
        vb = pb.keywords[name]
        same = _constructor_equals(va, vb) if name == "observer" else _normalized(va) == _normalized(vb)
        if not bool(same):
            return False
    return True


def qconfig_equals(q1: QConfigAny, q2: QConfigAny) -> bool:
    """True if both are None, or their activation and weight constructors are equal."""
    if q1 is None or q2 is None:
        return q1 is q2
    try:
        return _constructor_equals(q1.activation, q2.activation) and _constructor_equals(q1.weight, q2.weight)
    except AttributeError:
        return bool(q1 == q2)


# ------------------------------------------------------------------------------------------------ named qconfigs
_int8 = torch.int8
default_qconfig = QConfig(activation=obs.default_observer, weight=obs.default_weight_observer)
default_debug_qconfig = QConfig(activation=obs.default_debug_observer, weight=obs.default_weight_observer)
default_per_channel_qconfig = QConfig(activation=obs.default_observer, weight=obs.default_per_channel_weight_observer)
default_dynamic_qconfig = QConfig(activation=obs.default_dynamic_quant_observer, weight=obs.default_weight_observer)
float16_dynamic_qconfig = QConfig(activation=obs.PlaceholderObserver.with_args(dtype=torch.float16, is_dynamic=True),
                                  weight=obs.PlaceholderObserver.with_args(dtype=torch.float16))
float16_static_qconfig = QConfig(activation=obs.PlaceholderObserver.with_args(dtype=torch.float16),
                                 weight=obs.PlaceholderObserver.with_args(dtype=torch.float16))
per_channel_dynamic_qconfig = QConfig(activation=obs.default_dynamic_quant_observer,
                                      weight=obs.default_per_channel_weight_observer)
float_qparams_weight_only_qconfig = QConfig(activation=obs.default_placeholder_observer,
                                            weight=obs.default_float_qparams_observer)
float_qparams_weight_only_qconfig_4bit = QConfig(activation=obs.default_placeholder_observer,
                                                 weight=obs.default_float_qparams_observer_4bit)
default_reuse_input_qconfig = QConfig(activation=obs.default_reuse_input_observer, weight=obs.NoopObserver)
_symmetric_act = obs.HistogramObserver.with_args(dtype=_int8, reduce_range=False, eps=2**-12)
default_symmetric_qnnpack_qconfig = QConfig(activation=_symmetric_act, weight=obs.weight_observer_range_neg_127_to_127)
default_per_channel_symmetric_qnnpack_qconfig = QConfig(
    activation=_symmetric_act, weight=obs.per_channel_weight_observer_range_neg_127_to_127)
default_quint8_weight_qconfig = QConfig(activation=obs.HistogramObserver, weight=obs.MinMaxObserver)
_default_fp32_placeholder_qconfig = QConfig(activation=obs.PlaceholderObserver.with_args(dtype=torch.float32),
                                            weight=obs.PlaceholderObserver.with_args(dtype=torch.float32))
_default_quint8_placeholder_qconfig = QConfig(activation=obs.PlaceholderObserver.with_args(dtype=torch.uint8),
                                              weight=None)


def _symmetric_qat_act(fq: Any) -> Any:
    return fq.FusedMovingAvgObsFakeQuantize.with_args(observer=obs.MovingAverageMinMaxObserver, quant_min=-128,
                                                      quant_max=127, dtype=_int8, reduce_range=False, eps=2**-12)


_float32_noop = obs.NoopObserver.with_args(dtype=torch.float32)
# name -> builder(fxquant.fake_quantize): the qconfigs made of fake quants, built on first access
_FAKE_QUANT_QCONFIGS: dict[str, Callable[[Any], QConfig]] = {
    "default_qat_qconfig": lambda fq: QConfig(fq.default_fake_quant, fq.default_weight_fake_quant),
    "default_dynamic_qat_qconfig": lambda fq: QConfig(fq.default_dynamic_fake_quant, fq.default_weight_fake_quant),
    "default_weight_only_qconfig": lambda fq: QConfig(torch.nn.Identity, fq.default_weight_fake_quant),
    "default_activation_only_qconfig": lambda fq: QConfig(fq.default_fake_quant, torch.nn.Identity),
    "default_qat_qconfig_v2": lambda fq: QConfig(fq.default_fused_act_fake_quant, fq.default_fused_wt_fake_quant),
    "default_embedding_qat_qconfig": lambda fq: QConfig(_float32_noop, fq.default_embedding_fake_quant),
    "default_embedding_qat_qconfig_4bit": lambda fq: QConfig(_float32_noop, fq.default_embedding_fake_quant_4bit),
    "default_symmetric_qnnpack_qat_qconfig": lambda fq: QConfig(
        _symmetric_qat_act(fq), fq.fused_wt_fake_quant_range_neg_127_to_127),
    "default_per_channel_symmetric_qnnpack_qat_qconfig": lambda fq: QConfig(
        _symmetric_qat_act(fq), fq.fused_per_channel_wt_fake_quant_range_neg_127_to_127),
}


def __getattr__(name: str) -> Any:
    builder = _FAKE_QUANT_QCONFIGS.get(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from fxquant import fake_quantize
    value = globals()[name] = builder(fake_quantize)
    return value


# ------------------------------------------------------------------------------------------------ per backend
# backend -> (activation reduce_range (None: not passed), per-channel weights)
_BACKENDS: dict[str, tuple[Optional[bool], bool]] = {
    "x86": (True, True), "fbgemm": (True, True), "qnnpack": (False, False), "onednn": (None, True)}


def _check_backend(backend: Any, version: Any, versions: tuple[int, ...], fn: str) -> tuple[Optional[bool], bool]:
    if backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend {backend!r} is not supported; use one of {list(SUPPORTED_BACKENDS)}")
    if version not in versions or isinstance(version, bool):
        raise ValueError(f"{fn}: version {version!r} is not supported; use one of {list(versions)}")
    return _BACKENDS[backend]


def get_default_qconfig(backend: str = "x86", version: int = 0) -> QConfig:
    """The default post-training qconfig for ``backend`` ("x86", "fbgemm", "qnnpack", "onednn"; version 0).

    Activations: HistogramObserver, uint8, with ``reduce_range`` (0..127) on x86 / fbgemm. Weights: per-channel
    symmetric int8, except qnnpack (per-tensor symmetric int8).
    """
    reduce_range, per_channel = _check_backend(backend, version, (0,), "get_default_qconfig")
    if backend == "onednn" and not getattr(torch.cpu, "_is_vnni_supported", lambda: True)():
        warnings.warn("Default qconfig of oneDNN backend with reduce_range of false may have accuracy issues on CPU "
                      "without Vector Neural Network Instruction support.", stacklevel=2)
    weight = obs.default_per_channel_weight_observer if per_channel else obs.default_weight_observer
    return QConfig(activation=obs.HistogramObserver.with_args(reduce_range=bool(reduce_range)), weight=weight)


def get_default_qat_qconfig(backend: str = "x86", version: int = 1) -> QConfig:
    """The default quantization-aware-training qconfig for ``backend``.

    Version 1 (default): FusedMovingAvgObsFakeQuantize; version 0: FakeQuantize. Activations observed with a
    MovingAverageMinMaxObserver over 0..255 (``reduce_range`` on x86 / fbgemm); weights as in
    :func:`get_default_qconfig`.
    """
    reduce_range, per_channel = _check_backend(backend, version, (0, 1), "get_default_qat_qconfig")
    from fxquant import fake_quantize as fq
    act_cls = fq.FusedMovingAvgObsFakeQuantize if version == 1 else fq.FakeQuantize
    kwargs: dict[str, Any] = {"observer": obs.MovingAverageMinMaxObserver, "quant_min": 0, "quant_max": 255}
    if reduce_range is not None:
        kwargs["reduce_range"] = reduce_range
    weights = {(1, True): "default_fused_per_channel_wt_fake_quant", (1, False): "default_fused_wt_fake_quant",
               (0, True): "default_per_channel_weight_fake_quant", (0, False): "default_weight_fake_quant"}
    return QConfig(activation=act_cls.with_args(**kwargs), weight=getattr(fq, weights[(version, per_channel)]))


def get_default_qconfig_dict(backend: str = "x86", version: int = 0) -> dict[str, Any]:
    """Deprecated: ``get_default_qconfig_mapping(backend, version).to_dict()``."""
    warnings.warn("get_default_qconfig_dict is deprecated, use get_default_qconfig_mapping", FutureWarning, 2)
    from fxquant.qconfig_mapping import get_default_qconfig_mapping
    return get_default_qconfig_mapping(backend, version).to_dict()


def get_default_qat_qconfig_dict(backend: str = "x86", version: int = 1) -> dict[str, Any]:
    """Deprecated: ``get_default_qat_qconfig_mapping(backend, version).to_dict()``."""
    warnings.warn("get_default_qat_qconfig_dict is deprecated, use get_default_qat_qconfig_mapping", FutureWarning, 2)
    from fxquant.qconfig_mapping import get_default_qat_qconfig_mapping
    return get_default_qat_qconfig_mapping(backend, version).to_dict()


# ------------------------------------------------------------------------------------------------ inspection
_PER_CHANNEL_QSCHEMES = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)
_CONV_TRANSPOSE = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def _instance_class(ctor: Any) -> type:
    """The class of what ``ctor()`` builds, without building it when ``ctor`` is a class or ``with_args``."""
    built = _built_class(ctor)
    return built if isinstance(built, type) else type(ctor())


def _observer_of(instance: Any) -> Any:
    """A fake quant's observer, or the observer itself."""
    return getattr(instance, "activation_post_process", instance)


def check_qconfig_for_module(qconfig: QConfigAny, module: torch.nn.Module) -> None:
    """Raise ``ValueError`` if ``qconfig`` cannot quantize ``module`` (torch.ao's ``_assert_valid_qconfig``).

    ConvTranspose has no per-channel weight quantization: a per-channel weight observer (or a fake quant
    wrapping one; torch.ao only checks observers) is rejected. torch.ao's FX prepare does not run this check.
    """
    if qconfig is None or qconfig.weight is None or not isinstance(module, _CONV_TRANSPOSE):
        return
    weight_obs = _observer_of(qconfig.weight())
    if getattr(weight_obs, "qscheme", None) in _PER_CHANNEL_QSCHEMES:
        raise ValueError(f"{type(module).__name__} does not support per-channel weight quantization (weight "
                         f"observer {qconfig.weight!r}); use a per-tensor weight observer such as "
                         "fxquant.observer.default_weight_observer")


_assert_valid_qconfig = check_qconfig_for_module


def is_reuse_input_qconfig(qconfig: QConfigAny) -> bool:
    """True for qconfigs like :data:`default_reuse_input_qconfig` (output shares the input's observer)."""
    return (qconfig is not None and qconfig.activation is not None and qconfig.weight is not None
            and issubclass(_instance_class(qconfig.activation), obs.ReuseInputObserver)
            and issubclass(_instance_class(qconfig.weight), obs.NoopObserver))


_is_reuse_input_qconfig = is_reuse_input_qconfig


def activation_is_memoryless(qconfig: QConfig) -> bool:
    """True if the activation observer (or the one inside its fake quant) has ``averaging_constant == 1``."""
    act = _observer_of(qconfig.activation())
    return getattr(act, "averaging_constant", None) == 1


_activation_is_memoryless = activation_is_memoryless


class _ModuleDevice:
    """Picklable zero-argument callable: ``{"device": <module's device>}``, or None for a module without tensors."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self) -> Optional[dict[str, torch.device]]:
        devices = {t.device for t in self.module.parameters()} | {t.device for t in self.module.buffers()}
        return {"device": min(devices, key=str)} if devices else None


def qconfig_on_module_device(qconfig: QConfigAny, module: Optional[torch.nn.Module]) -> QConfigAny:
    """``qconfig`` with constructors that build observers on ``module``'s device (via ``factory_kwargs``).

    Constructors that do not accept ``factory_kwargs`` are kept as they are (torch.ao's
    ``_add_module_to_qconfig_obs_ctr``). The device is read when an observer is built, not now.
    """
    if module is None or qconfig is None or not isinstance(qconfig, QConfig):
        return qconfig
    device_kwargs = _ModuleDevice(module)

    def on_device(ctor: Any) -> Any:
        try:
            ctor.with_args(factory_kwargs=None)()
        except (AttributeError, TypeError):
            return ctor
        return ctor.with_callable_args(factory_kwargs=device_kwargs)

    return QConfig(on_device(qconfig.activation), on_device(qconfig.weight))


_add_module_to_qconfig_obs_ctr = qconfig_on_module_device
