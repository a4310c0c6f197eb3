"""Does a QConfig satisfy a backend's DTypeConfig? The same decision as torch.ao's prepare, plus the reason.

torch.ao (``fx/prepare.py: _is_pattern_dtype_config_and_qconfig_supported_by_backend``) accepts a pattern
for a qconfig when some DTypeConfig of the pattern passes all of these checks (a DTypeConfig entry that is
``None`` always passes):

* input activation: dtype equal, ``is_dynamic`` equal, activation constraints hold;
* output activation: dtype equal (a dynamic activation counts as float32 output), constraints hold;
* weight: dtype equal, weight constraints hold;
* bias: float16 when activation and weight are float16 and static, else float32 -- must equal ``bias_dtype``.

Constraints (:class:`DTypeWithConstraints`) are checked only when the observer's dtype is the constrained
dtype: quant_min/quant_max inside the bounds, ``eps`` >= ``scale_min_lower_bound``, and for fixed-qparams
ops a FixedQParamsObserver / FixedQParamsFakeQuantize with exactly the given scale and zero point.

torch.ao checks weight and bias only where they are inputs of the graph node (functional ``F.linear``,
``F.conv2d``, ...: ``_input_type_to_index``); for module patterns (``nn.Linear``) it checks the activations
only. Pass ``roles=ACTIVATION_ROLES`` to reproduce that for module patterns. Where torch.ao would crash on
a constructor whose instance has no ``dtype`` (``nn.Identity`` in default_weight_only_qconfig), fxquant
treats that tensor as float32.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fxquant._dtypes import normalize_dtype

from .dtype_config import DTypeConfig, DTypeWithConstraints

__all__ = ["qconfig_matches_dtype_config", "find_dtype_config", "ALL_ROLES", "ACTIVATION_ROLES"]

ALL_ROLES: tuple[str, ...] = ("input", "output", "weight", "bias")
ACTIVATION_ROLES: tuple[str, ...] = ("input", "output")
_FIXED_QPARAMS_CLASSES = frozenset({"FixedQParamsObserver", "FixedQParamsFakeQuantize"})


@dataclass
class _Side:
    """One instantiated observer / fake quant of a qconfig, with what the checks read from it."""

    label: str                    # "activation observer HistogramObserver"
    instance: Any                 # None when the constructor is None
    dtype: torch.dtype | None     # plain dtype; float32 when the instance has no dtype
    is_dynamic: bool

    @classmethod
    def build(cls, constructor: Callable | None, role: str, is_qat: bool) -> _Side:
        kind = "fake quant" if is_qat else "observer"
        if constructor is None:
            return cls(f"{role} {kind} None", None, torch.float32, False)
        if isinstance(constructor, torch.nn.Module) or not callable(constructor):
            raise TypeError(f"qconfig.{role} must be an observer / fake quant constructor (a class or "
                            f"Cls.with_args(...)), not an instance; got {constructor!r}")
        instance = constructor()
        dtype = getattr(instance, "dtype", torch.float32)
        dtype = normalize_dtype(dtype) if isinstance(dtype, torch.dtype) else dtype
        return cls(f"{role} {kind} {type(instance).__name__}", instance, dtype,
                   bool(getattr(instance, "is_dynamic", False)))

    @property
    def observer(self) -> Any:
        """The observer (a fake quant's inner ``activation_post_process``)."""
        return getattr(self.instance, "activation_post_process", self.instance)


@dataclass
class _QConfigView:
    activation: _Side
    weight: _Side

    @classmethod
    def build(cls, qconfig: Any, is_qat: bool) -> _QConfigView:
        if not hasattr(qconfig, "activation") or not hasattr(qconfig, "weight"):
            raise TypeError(f"expected a QConfig (a named tuple (activation, weight)), got {qconfig!r}")
        return cls(_Side.build(qconfig.activation, "activation", is_qat),
                   _Side.build(qconfig.weight, "weight", is_qat))

    @property
    def bias_dtype(self) -> torch.dtype:
        fp16 = self.activation.dtype == torch.float16 and self.weight.dtype == torch.float16
        return torch.float16 if fp16 and not self.activation.is_dynamic else torch.float32


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _check_range(obs: Any, spec: DTypeWithConstraints, label: str) -> str:
    lo, hi = spec.quant_min_lower_bound, spec.quant_max_upper_bound
    if lo is None or hi is None:
        return ""
    qmin, qmax = getattr(obs, "quant_min", None), getattr(obs, "quant_max", None)
    if qmin is None or qmax is None:
        return f"{label} must set quant_min and quant_max (the backend allows {lo}..{hi})"
    if qmin < lo or qmax > hi:
        return f"{label} quant range {qmin}..{qmax} is outside the backend's {lo}..{hi}"
    return ""


def _check_scale_min(obs: Any, spec: DTypeWithConstraints, label: str) -> str:
    bound = spec.scale_min_lower_bound
    if bound is None:
        return ""
    eps = getattr(obs, "eps", None)
    if eps is None:
        return f"{label} must set eps (the backend's smallest scale is {bound})"
    if bool(eps < bound):
        value = eps.item() if isinstance(eps, torch.Tensor) and eps.numel() == 1 else eps
        return f"{label} eps {value} is below the backend's smallest scale {bound}"
    return ""


def _check_fixed_qparams(side: _Side, spec: DTypeWithConstraints, label: str) -> str:
    scale, zero_point = spec.scale_exact_match, spec.zero_point_exact_match
    if scale is None or zero_point is None:
        return ""
    hint = "use get_default_qconfig_mapping(...) / get_default_qat_qconfig_mapping(...), which set it"
    if not _FIXED_QPARAMS_CLASSES & {c.__name__ for c in type(side.instance).__mro__}:
        return (f"{label} is not a FixedQParamsObserver / FixedQParamsFakeQuantize, which this fixed-qparams "
                f"op needs (scale {scale}, zero point {zero_point}); {hint}")
    obs = side.observer
    if bool(obs.scale != scale) or bool(obs.zero_point != zero_point):
        return (f"{label} fixed scale {float(obs.scale)} / zero point {int(obs.zero_point)} differ from the "
                f"backend's {scale} / {zero_point}; {hint}")
    return ""


_CONSTRAINT_CHECKS = (_check_range, _check_scale_min)


def _violated_constraint(side: _Side, spec: DTypeWithConstraints) -> str:
    """Why ``side`` breaks ``spec``'s constraints, or "" (also "" when the dtypes differ, as in torch.ao)."""
    if spec.dtype is None or side.instance is None or side.dtype != spec.dtype:
        return ""
    for check in _CONSTRAINT_CHECKS:
        why = check(side.observer, spec, side.label)
        if why:
            return why
    return _check_fixed_qparams(side, spec, side.label)


def _mode(dynamic: Any) -> str:
    return "dynamic" if dynamic else "static"


def _check_input(view: _QConfigView, dc: DTypeConfig) -> tuple[str, bool]:
    act = view.activation
    if dc.input_dtype is None:
        return "", False
    if act.dtype != dc.input_dtype or act.is_dynamic != bool(dc.is_dynamic):
        return (f"input: {act.label} gives {_name(act.dtype)} ({_mode(act.is_dynamic)}), the backend takes "
                f"{_name(dc.input_dtype)} ({_mode(dc.is_dynamic)})"), False
    why = _violated_constraint(act, dc.input_dtype_with_constraints)
    return (f"input: {why}" if why else ""), bool(why)


def _check_output(view: _QConfigView, dc: DTypeConfig) -> tuple[str, bool]:
    act = view.activation
    if dc.output_dtype is None:
        return "", False
    out_dtype = torch.float32 if act.is_dynamic else act.dtype
    if out_dtype != dc.output_dtype:
        return (f"output: {act.label} gives {_name(out_dtype)}, the backend produces "
                f"{_name(dc.output_dtype)}"), False
    why = _violated_constraint(act, dc.output_dtype_with_constraints)
    return (f"output: {why}" if why else ""), bool(why)


def _check_weight(view: _QConfigView, dc: DTypeConfig) -> tuple[str, bool]:
    weight = view.weight
    if dc.weight_dtype is None:
        return "", False
    if weight.dtype != dc.weight_dtype:
        return f"weight: {weight.label} gives {_name(weight.dtype)}, the backend takes {_name(dc.weight_dtype)}", False
    why = _violated_constraint(weight, dc.weight_dtype_with_constraints)
    return (f"weight: {why}" if why else ""), bool(why)


def _check_bias(view: _QConfigView, dc: DTypeConfig) -> tuple[str, bool]:
    if dc.bias_dtype is None or view.bias_dtype == dc.bias_dtype:
        return "", False
    return f"bias: the qconfig implies {_name(view.bias_dtype)} bias, the backend takes {_name(dc.bias_dtype)}", False


# role -> check returning (reason or "", whether the reason is a violated constraint)
_ROLE_CHECKS: dict[str, Callable[[_QConfigView, DTypeConfig], tuple[str, bool]]] = {
    "input": _check_input, "output": _check_output, "weight": _check_weight, "bias": _check_bias}


def _check_roles(roles: Collection[str]) -> None:
    unknown = set(roles) - set(_ROLE_CHECKS)
    if unknown or isinstance(roles, str):
        raise ValueError(f"roles must be a collection of {list(_ROLE_CHECKS)}, got {roles!r}")


def _match_view(view: _QConfigView, dc: DTypeConfig, roles: Collection[str], warn: bool) -> tuple[bool, str]:
    if not isinstance(dc, DTypeConfig):
        raise TypeError(f"expected a DTypeConfig, got {dc!r}")
    for role in ALL_ROLES:
        if role not in roles:
            continue
        why, is_constraint = _ROLE_CHECKS[role](view, dc)
        if why:
            if warn and is_constraint:
                warnings.warn(f"{why}; this DTypeConfig ({dc.short_str()}) is skipped", stacklevel=3)
            return False, why
    return True, ""


def qconfig_matches_dtype_config(qconfig: Any, dtype_config: DTypeConfig, is_qat: bool = False, *,
                                 roles: Collection[str] = ALL_ROLES, warn: bool = False) -> tuple[bool, str]:
    """Whether ``qconfig``'s observers satisfy ``dtype_config``, and if not, why (one sentence).

    ``qconfig`` is a QConfig (named tuple of observer / fake-quant constructors; they are instantiated to
    read ``dtype``, ``is_dynamic``, ``quant_min``/``quant_max``, ``eps``, fixed scale / zero point).
    ``is_qat`` only changes the wording ("fake quant" instead of "observer"). ``roles`` picks which of
    ``"input"``, ``"output"``, ``"weight"``, ``"bias"`` to check (see the module docstring). With
    ``warn=True`` a violated constraint (not a plain dtype mismatch) also issues a ``UserWarning``, as torch.ao
    does. Returns ``(True, "")`` on a match, ``(False, reason)`` otherwise; ``qconfig=None`` never matches.
    """
    _check_roles(roles)
    if qconfig is None:
        return False, "qconfig is None: the pattern stays in float"
    return _match_view(_QConfigView.build(qconfig, is_qat), dtype_config, roles, warn)


def find_dtype_config(qconfig: Any, dtype_configs: Iterable[DTypeConfig], is_qat: bool = False, *,
                      roles: Collection[str] = ALL_ROLES, warn: bool = False
                      ) -> tuple[DTypeConfig | None, list[str]]:
    """The first of ``dtype_configs`` that ``qconfig`` satisfies (None if none does), and the reasons each
    earlier config was rejected (``"<config>: <reason>"``). Instantiates the observers once."""
    _check_roles(roles)
    dtype_configs = list(dtype_configs)
    if qconfig is None:
        return None, ["qconfig is None: the pattern stays in float"]
    if not dtype_configs:
        return None, ["the backend lists no dtype configs for this pattern"]
    view = _QConfigView.build(qconfig, is_qat)
    reasons = []
    for dc in dtype_configs:
        ok, why = _match_view(view, dc, roles, warn)
        if ok:
            return dc, reasons
        reasons.append(f"[{dc.short_str()}] {why}")
    return None, reasons
