"""FakeQuantizeBase: the switches shared by every fake-quant module (re-exported by :mod:`fxquant.fake_quantize`)."""
from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch

from fxquant._partial import with_args, with_callable_args

__all__ = ["FakeQuantizeBase", "enable_fake_quant", "disable_fake_quant", "enable_observer", "disable_observer"]


class FakeQuantizeBase(torch.nn.Module, metaclass=ABCMeta):
    """Base of fake-quant modules: ``forward`` observes (when enabled) and fake-quantizes (when enabled).

    Buffers ``fake_quant_enabled`` and ``observer_enabled`` (uint8, shape (1,), as torch.ao: buffers so DDP
    replicates them) hold the two switches.
    """

    fake_quant_enabled: torch.Tensor
    observer_enabled: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe and / or fake-quantize ``x``."""

    @abstractmethod
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero point convert will use."""

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Switch fake quantization on (or off with ``enabled=False``)."""
        self.fake_quant_enabled[0] = 1 if enabled else 0

    def disable_fake_quant(self) -> None:
        """Switch fake quantization off: forward returns its input (observation may continue)."""
        self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> None:
        """Switch statistics collection on (or off with ``enabled=False``)."""
        self.observer_enabled[0] = 1 if enabled else 0

    def disable_observer(self) -> None:
        """Freeze the qparams: forward stops updating the statistics."""
        self.enable_observer(False)

    with_args = classmethod(with_args)
    with_callable_args = classmethod(with_callable_args)


def enable_fake_quant(mod: torch.nn.Module) -> None:
    """``model.apply(enable_fake_quant)``: switch fake quantization on in every fake-quant module."""
    if isinstance(mod, FakeQuantizeBase):
        mod.enable_fake_quant()


def disable_fake_quant(mod: torch.nn.Module) -> None:
    """``model.apply(disable_fake_quant)``: switch fake quantization off in every fake-quant module."""
    if isinstance(mod, FakeQuantizeBase):
        mod.disable_fake_quant()


def enable_observer(mod: torch.nn.Module) -> None:
    """``model.apply(enable_observer)``: resume statistics collection in every fake-quant module."""
    if isinstance(mod, FakeQuantizeBase):
        mod.enable_observer()


def disable_observer(mod: torch.nn.Module) -> None:
    """``model.apply(disable_observer)``: freeze the qparams of every fake-quant module."""
    if isinstance(mod, FakeQuantizeBase):
        mod.disable_observer()
