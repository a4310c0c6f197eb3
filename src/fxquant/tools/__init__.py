"""User-facing tools: explain / compare (per-layer report), save / load, command line, demo.

    from fxquant.tools import save, load, register_safe, CompareReport
    from fxquant.tools.compare import compare      # (``fxquant.tools.compare`` itself is the submodule)

Submodules are imported on first use (``fxquant.tools.compare`` pulls in the pipeline, ``report_html`` matplotlib).
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CompareReport", "CompareRow", "save", "load", "register_safe", "ModelFileError", "UnsafeReferenceError",
           "format_explain"]

_WHERE = {"CompareReport": "compare", "CompareRow": "compare", "save": "serialize", "load": "serialize",
          "register_safe": "serialize", "ModelFileError": "serialize", "UnsafeReferenceError": "serialize",
          "format_explain": "explain"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
