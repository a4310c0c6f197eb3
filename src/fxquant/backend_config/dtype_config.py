"""Data types a backend accepts for one pattern: :class:`DTypeConfig`, :class:`DTypeWithConstraints`,
and :class:`ObservationType` (how observers are placed around a pattern).

Dtypes are stored as *plain* dtypes: torch's legacy quint8 given by a user becomes ``torch.uint8`` (see
:func:`fxquant._dtypes.normalize_dtype`). Both classes are frozen (hashable, safe to share between configs);
build a changed copy with :func:`dataclasses.replace`.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import torch

from fxquant._dtypes import normalize_dtype

__all__ = ["ObservationType", "DTypeWithConstraints", "DTypeConfig"]


class ObservationType(enum.Enum):
    """How the observers around a pattern relate (same names and values as torch.ao)."""

    OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT = 0
    """Input and output get their own observers from ``qconfig.activation`` (conv, linear, softmax)."""
    OUTPUT_SHARE_OBSERVER_WITH_INPUT = 1
    """The output shares the input's observer instance (cat, max pooling, reshape)."""
    INPUT_OUTPUT_NOT_OBSERVED = 2
    """Neither input nor output is observed (``x.shape``, ``x.size()``)."""

    @classmethod
    def coerce(cls, value: Any) -> ObservationType:
        """Return ``value`` as an :class:`ObservationType`; accepts torch.ao's enum (matched by name)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, enum.Enum) and value.name in cls.__members__:
            return cls[value.name]
        raise TypeError(f"expected an ObservationType (one of {sorted(cls.__members__)}), got {value!r}")


def _check_dtype(value: Any, what: str) -> torch.dtype | None:
    if value is not None and not isinstance(value, torch.dtype):
        raise TypeError(f"{what} must be a torch.dtype or None, got {value!r}")
    return normalize_dtype(value)


def _check_number(value: Any, what: str, integral: bool = False) -> None:
    kinds = (int,) if integral else (int, float)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
        kind = "an int" if integral else "a number"
        raise TypeError(f"{what} must be {kind} or None, got {value!r}")


_CONSTRAINT_FIELDS = ("quant_min_lower_bound", "quant_max_upper_bound", "scale_min_lower_bound",
                      "scale_max_upper_bound", "scale_exact_match", "zero_point_exact_match")


@dataclasses.dataclass(frozen=True)
class DTypeWithConstraints:
    """A dtype plus the limits a backend puts on quantization parameters of that dtype.

    * ``quant_min_lower_bound`` / ``quant_max_upper_bound``: the qconfig's ``quant_min``/``quant_max`` must lie
      inside this range (both bounds must be given for the check to apply, as in torch.ao).
    * ``scale_min_lower_bound``: the qconfig's smallest scale (its observer's ``eps``) must be at least this.
      ``scale_max_upper_bound`` is recorded but, as in torch.ao, not enforced.
    * ``scale_exact_match`` / ``zero_point_exact_match``: fixed-qparams ops (sigmoid, tanh, ...) need a
      FixedQParamsObserver / FixedQParamsFakeQuantize with exactly this scale and zero point.

    Example::

        DTypeWithConstraints(dtype=torch.int8, quant_min_lower_bound=-127, quant_max_upper_bound=127)
    """

    dtype: torch.dtype | None = None
    quant_min_lower_bound: int | float | None = None
    quant_max_upper_bound: int | float | None = None
    scale_min_lower_bound: int | float | None = None
    scale_max_upper_bound: int | float | None = None
    scale_exact_match: float | None = None
    zero_point_exact_match: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _check_dtype(self.dtype, "DTypeWithConstraints.dtype"))
        for name in _CONSTRAINT_FIELDS:
            _check_number(getattr(self, name), f"DTypeWithConstraints.{name}", name == "zero_point_exact_match")
        lo, hi = self.quant_min_lower_bound, self.quant_max_upper_bound
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"DTypeWithConstraints: quant_min_lower_bound ({lo}) > quant_max_upper_bound ({hi})")
        smin, smax = self.scale_min_lower_bound, self.scale_max_upper_bound
        if smin is not None and smax is not None and smin > smax:
            raise ValueError(f"DTypeWithConstraints: scale_min_lower_bound ({smin}) > scale_max_upper_bound ({smax})")
        if (self.scale_exact_match is None) != (self.zero_point_exact_match is None):
            raise ValueError("DTypeWithConstraints: give both scale_exact_match and zero_point_exact_match "
                             f"(fixed qparams) or neither; got scale={self.scale_exact_match!r}, "
                             f"zero_point={self.zero_point_exact_match!r}")

    @property
    def has_constraints(self) -> bool:
        """True when any constraint besides the dtype is set."""
        return any(getattr(self, name) is not None for name in _CONSTRAINT_FIELDS)

    @classmethod
    def coerce(cls, value: Any, what: str = "dtype") -> DTypeWithConstraints:
        """Turn a dtype, ``None``, a DTypeWithConstraints (also torch.ao's, read by attribute) or a dict into one."""
        if isinstance(value, cls):
            return value
        if value is None or isinstance(value, torch.dtype):
            return cls(dtype=value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"dtype", *_CONSTRAINT_FIELDS}
            if unknown:
                raise ValueError(f"unknown DTypeWithConstraints keys {sorted(unknown)} for {what}; "
                                 f"valid keys: {['dtype', *_CONSTRAINT_FIELDS]}")
            return cls(**value)
        if hasattr(value, "dtype") and all(hasattr(value, name) for name in _CONSTRAINT_FIELDS):
            return cls(value.dtype, *(getattr(value, name) for name in _CONSTRAINT_FIELDS))
        raise TypeError(f"{what} must be a torch.dtype, a DTypeWithConstraints or None, got {value!r}")


_DTYPE_KEYS = ("input_dtype", "output_dtype", "weight_dtype")


@dataclasses.dataclass(frozen=True, init=False)
class DTypeConfig:
    """The dtypes a backend supports for one pattern: input / output activations, weight and bias.

    Each of ``input_dtype``, ``output_dtype`` and ``weight_dtype`` is a dtype or a
    :class:`DTypeWithConstraints`; ``is_dynamic=True`` marks dynamic quantization (the activation's qparams
    are computed at run time and the output stays float).

    Example::

        DTypeConfig(input_dtype=torch.uint8, output_dtype=torch.uint8, weight_dtype=torch.int8,
                    bias_dtype=torch.float)   # legacy quint8 / qint8 are accepted and stored as uint8 / int8
    """

    input_dtype_with_constraints: DTypeWithConstraints
    output_dtype_with_constraints: DTypeWithConstraints
    weight_dtype_with_constraints: DTypeWithConstraints
    bias_dtype: torch.dtype | None
    is_dynamic: bool | None

    def __init__(self, input_dtype: torch.dtype | DTypeWithConstraints | None = None,
                 output_dtype: torch.dtype | DTypeWithConstraints | None = None,
                 weight_dtype: torch.dtype | DTypeWithConstraints | None = None,
                 bias_dtype: torch.dtype | None = None, is_dynamic: bool | None = None) -> None:
        for key, value in zip(_DTYPE_KEYS, (input_dtype, output_dtype, weight_dtype)):
            object.__setattr__(self, f"{key}_with_constraints", DTypeWithConstraints.coerce(value, key))
        object.__setattr__(self, "bias_dtype", _check_dtype(bias_dtype, "DTypeConfig.bias_dtype"))
        if is_dynamic is not None and not isinstance(is_dynamic, bool):
            raise TypeError(f"DTypeConfig.is_dynamic must be a bool or None, got {is_dynamic!r}")
        object.__setattr__(self, "is_dynamic", is_dynamic)

    @property
    def input_dtype(self) -> torch.dtype | None:
        """The input activation dtype (plain dtype)."""
        return self.input_dtype_with_constraints.dtype

    @property
    def output_dtype(self) -> torch.dtype | None:
        """The output activation dtype (plain dtype)."""
        return self.output_dtype_with_constraints.dtype

    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The weight dtype (plain dtype)."""
        return self.weight_dtype_with_constraints.dtype

    @classmethod
    def from_dict(cls, dtype_config_dict: Mapping[str, Any]) -> DTypeConfig:
        """Build from a dict with optional keys ``input_dtype``, ``output_dtype``, ``weight_dtype``
        (dtype or DTypeWithConstraints), ``bias_dtype`` (dtype) and ``is_dynamic`` (bool)."""
        if not isinstance(dtype_config_dict, Mapping):
            raise TypeError(f"DTypeConfig.from_dict expects a dict, got {dtype_config_dict!r}")
        valid = (*_DTYPE_KEYS, "bias_dtype", "is_dynamic")
        unknown = set(dtype_config_dict) - set(valid)
        if unknown:
            raise ValueError(f"unknown DTypeConfig keys {sorted(unknown)}; valid keys: {list(valid)}")
        return cls(**dtype_config_dict)

    def to_dict(self) -> dict[str, Any]:
        """The dict form read by :meth:`from_dict`; unset entries are left out. A dtype without constraints
        is written as the plain dtype, one with constraints as its :class:`DTypeWithConstraints`."""
        out: dict[str, Any] = {}
        for key in _DTYPE_KEYS:
            spec: DTypeWithConstraints = getattr(self, f"{key}_with_constraints")
            if spec.dtype is not None:
                out[key] = spec if spec.has_constraints else spec.dtype
        if self.bias_dtype is not None:
            out["bias_dtype"] = self.bias_dtype
        if self.is_dynamic is not None:
            out["is_dynamic"] = self.is_dynamic
        return out

    def short_str(self) -> str:
        """Compact text such as ``in=uint8 out=uint8 w=int8 b=float32`` (constraints in brackets)."""
        parts = []
        for label, key in (("in", "input_dtype"), ("out", "output_dtype"), ("w", "weight_dtype")):
            spec: DTypeWithConstraints = getattr(self, f"{key}_with_constraints")
            if spec.dtype is not None:
                parts.append(f"{label}={_short_spec(spec)}")
        if self.bias_dtype is not None:
            parts.append(f"b={_dtype_name(self.bias_dtype)}")
        if self.is_dynamic:
            parts.append("dynamic")
        return " ".join(parts)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_CONSTRAINT_LABELS = {"quant_min_lower_bound": "qmin>=", "quant_max_upper_bound": "qmax<=",
                      "scale_min_lower_bound": "scale>=", "scale_max_upper_bound": "scale<=",
                      "scale_exact_match": "scale=", "zero_point_exact_match": "zp="}


def _short_spec(spec: DTypeWithConstraints) -> str:
    assert spec.dtype is not None
    bits = [f"{label}{getattr(spec, name):g}" for name, label in _CONSTRAINT_LABELS.items()
            if getattr(spec, name) is not None]
    return _dtype_name(spec.dtype) + (f"[{','.join(bits)}]" if bits else "")
