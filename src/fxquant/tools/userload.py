"""Import a user's model factory and calibration data from ``package.module:name`` specs (the command line's
``--model`` / ``--calib``), with errors that say what is wrong and how to fix it (:class:`UserInputError`)."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Iterable, Optional

import torch
from torch import nn

__all__ = ["UserInputError", "import_object", "load_model", "load_batches", "as_inputs", "shapes"]


class UserInputError(ValueError):
    """Something the user gave (a path, a spec, data) is wrong; the message says how to fix it."""


def import_object(spec: str, what: str) -> Any:
    """The object named by ``"package.module:attr"`` (the current directory is importable, like ``python -m``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserInputError(f"{what} {spec!r} must look like package.module:name (e.g. my_pkg.models:build)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserInputError(f"{what}: cannot import module {module_name!r} ({exc}). Run from the directory that "
                             f"contains it, set PYTHONPATH, or pip install the package") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise UserInputError(f"{what}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))[:10]
            raise UserInputError(f"{what}: {module_name!r} has no attribute {attr!r}; it has: {', '.join(public)}")
        obj = getattr(obj, part)
    return obj


def as_inputs(batch: Any) -> tuple:
    """A batch as positional inputs: a tensor -> (tensor,), a tuple / list -> tuple, a dict is rejected."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        return tuple(batch)
    raise UserInputError(f"a calibration batch must be a tensor or a tuple of positional inputs, got "
                         f"{type(batch).__name__}; yield x or (x, ...) from --calib (not (x, label) dicts)")


def shapes(inputs: tuple) -> str:
    """``(1, 3, 32, 32) float32, (5,) int64`` for messages."""
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor)
                     else type(x).__name__ for x in inputs)


def load_model(spec: str) -> tuple[nn.Module, Optional[tuple]]:
    """Call the factory ``spec`` names; it returns a model, or ``(model, example_inputs)``. The model is put in
    eval mode."""
    factory = import_object(spec, "--model")
    if isinstance(factory, nn.Module):
        result: Any = factory
    elif callable(factory):
        try:
            result = factory()
        except Exception as exc:  # noqa: BLE001 - user code
            raise UserInputError(f"--model: calling {spec}() raised {type(exc).__name__}: {exc}") from None
    else:
        raise UserInputError(f"--model {spec!r} is a {type(factory).__name__}; give a function returning an "
                             f"nn.Module (or (model, example_inputs))")
    example = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, example = result[0], as_inputs(result[1])
    if not isinstance(result, nn.Module):
        raise UserInputError(f"--model: {spec}() returned a {type(result).__name__}, not an nn.Module")
    return result.eval(), example


def load_batches(spec: str, limit: Optional[int] = None) -> list[tuple]:
    """The calibration batches ``spec`` names (a list / iterable, or a function returning one), as input tuples."""
    obj = import_object(spec, "--calib")
    if callable(obj) and not isinstance(obj, (list, tuple, torch.Tensor)):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001 - user code
            raise UserInputError(f"--calib: calling {spec}() raised {type(exc).__name__}: {exc}") from None
    if isinstance(obj, torch.Tensor):
        obj = [obj]
    if not isinstance(obj, Iterable):
        raise UserInputError(f"--calib {spec!r} gave a {type(obj).__name__}; give a list of batches or a function "
                             f"returning an iterable of batches")
    batches = []
    for batch in obj:
        batches.append(as_inputs(batch))
        if limit is not None and len(batches) >= limit:
            break
    if not batches:
        raise UserInputError(f"--calib {spec!r} yielded no batches; calibration needs at least one")
    return batches
