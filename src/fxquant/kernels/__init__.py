"""Kernel tables per device: ``x86`` (capabilities + measured rules), ``onednn`` (int8 ops on plain tensors),
``portable`` (reference math in aten ops, any device)."""
from fxquant.kernels import onednn, portable, x86
from fxquant.kernels.x86 import Facts, Rule, choose

__all__ = ["onednn", "portable", "x86", "Facts", "Rule", "choose"]
