"""Reference quantized Conv1d/2d/3d and ConvTranspose1d/2d/3d: quantized weight buffers, float convolution."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.nn.quantized.reference._module import ReferenceWeightMixin

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


class _RefConvMixin(ReferenceWeightMixin):
    """Shared construction: ``cls(**ctor_kwargs_of_the_float_conv, weight_qparams=...)``."""

    _IS_REFERENCE = True
    _FLOAT_CLS: type[nn.Module]
    _CTOR_FIELDS: tuple[str, ...]

    def _init_ref(self, args: dict[str, Any], weight_qparams: Mapping[str, Any] | None) -> None:
        self._FLOAT_CLS.__init__(self, **args)
        self._attach_weight("weight", self._parameters["weight"], weight_qparams)  # type: ignore[attr-defined]

    @classmethod
    def from_float(cls, float_conv: nn.Module, weight_qparams: Mapping[str, Any],
                   keep_original_weights: bool = False) -> Any:
        """Quantize ``float_conv``'s weight with ``weight_qparams`` (torch.ao's dict); bias and geometry copied."""
        if not isinstance(float_conv, cls._FLOAT_CLS):
            raise TypeError(f"{cls.__name__}.from_float expects an nn.{cls._FLOAT_CLS.__name__}, "
                            f"got {type(float_conv).__name__}")
        def build() -> Any:
            args = {field: getattr(float_conv, field) for field in cls._CTOR_FIELDS}
            args["bias"] = float_conv.bias is not None
            return cls(**args, device="meta", dtype=float_conv.weight.dtype)

        ref = cls._new_like(float_conv, build)
        ref._attach_weight("weight", float_conv.weight, weight_qparams, keep_original_weights)
        ref.register_parameter("bias", None if float_conv.bias is None else
                               nn.Parameter(float_conv.bias.detach().clone()))
        return ref


_CONV_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode")
_CONVT_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups",
                 "dilation", "padding_mode")


class _RefConv(_RefConvMixin):
    """``self._conv_forward(x, dequantized weight, bias)``: honours ``padding_mode`` (torch.ao's ignores it)."""

    _CTOR_FIELDS = _CONV_FIELDS

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: Any = None, dtype: torch.dtype | None = None,
                 weight_qparams: Mapping[str, Any] | None = None) -> None:
        args = dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                    padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                    device=device, dtype=dtype)
        self._init_ref(args, weight_qparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.get_weight(), self.bias)  # type: ignore[attr-defined,no-any-return]


class Conv1d(_RefConv, nn.Conv1d):
    """Reference quantized Conv1d (see :class:`_RefConv`)."""

    _FLOAT_CLS = nn.Conv1d


class Conv2d(_RefConv, nn.Conv2d):
    """Reference quantized Conv2d (see :class:`_RefConv`)."""

    _FLOAT_CLS = nn.Conv2d


class Conv3d(_RefConv, nn.Conv3d):
    """Reference quantized Conv3d (see :class:`_RefConv`)."""

    _FLOAT_CLS = nn.Conv3d


class _RefConvTranspose(_RefConvMixin):
    """``F.conv_transposeNd`` with the dequantized weight; ``output_size`` works (torch.ao's crashes on it)."""

    _CTOR_FIELDS = _CONVT_FIELDS
    _FUNCTIONAL: Any
    _SPATIAL: int

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 output_padding: Any = 0, groups: int = 1, bias: bool = True, dilation: Any = 1,
                 padding_mode: str = "zeros", device: Any = None, dtype: torch.dtype | None = None,
                 weight_qparams: Mapping[str, Any] | None = None) -> None:
        args = dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                    padding=padding, output_padding=output_padding, groups=groups, bias=bias, dilation=dilation,
                    padding_mode=padding_mode, device=device, dtype=dtype)
        self._init_ref(args, weight_qparams)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        m: Any = self
        output_padding = m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, self._SPATIAL,
                                           m.dilation)
        return type(self)._FUNCTIONAL(x, self.get_weight(), m.bias, m.stride, m.padding, output_padding, m.groups,
                                      m.dilation)


class ConvTranspose1d(_RefConvTranspose, nn.ConvTranspose1d):
    """Reference quantized ConvTranspose1d."""

    _FLOAT_CLS = nn.ConvTranspose1d
    _FUNCTIONAL = staticmethod(F.conv_transpose1d)
    _SPATIAL = 1


class ConvTranspose2d(_RefConvTranspose, nn.ConvTranspose2d):
    """Reference quantized ConvTranspose2d."""

    _FLOAT_CLS = nn.ConvTranspose2d
    _FUNCTIONAL = staticmethod(F.conv_transpose2d)
    _SPATIAL = 2


class ConvTranspose3d(_RefConvTranspose, nn.ConvTranspose3d):
    """Reference quantized ConvTranspose3d."""

    _FLOAT_CLS = nn.ConvTranspose3d
    _FUNCTIONAL = staticmethod(F.conv_transpose3d)
    _SPATIAL = 3
