"""The DTypeConfigs the built-in backends are made of (named as in torch.ao's backend files).

torch.ao's legacy dtypes appear as the plain dtypes :func:`fxquant._dtypes.normalize_dtype` maps them to:
quint8 -> uint8, qint8 -> int8, quint4x2 -> uint8 (fxquant stores 4-bit values in uint8 with quant range 0..15,
so the 4-bit weight-only config has the same plain dtypes as the 8-bit one).
"""
from __future__ import annotations

import torch

from .dtype_config import DTypeConfig, DTypeWithConstraints

U8, I8, U4X2 = torch.uint8, torch.int8, torch.uint8  # quint8, qint8, quint4x2
F32, F16 = torch.float32, torch.float16

# conv / linear: uint8 activations, int8 weights, float bias
weighted_op_quint8_dtype_config = DTypeConfig(U8, U8, I8, F32)
# ops without weights
default_op_quint8_dtype_config = DTypeConfig(U8, U8)
default_op_fp16_dtype_config = DTypeConfig(F16, F16, F16, F16)
default_dynamic_int8_dtype_config = DTypeConfig(U8, F32, I8, F32, is_dynamic=True)
default_dynamic_float16_dtype_config = DTypeConfig(F16, F32, F16, F32, is_dynamic=True)
# LayerNorm: quantized activations, float weight and bias
input_output_only_quint8_dtype_config = DTypeConfig(U8, U8, F32, F32)
weight_only_quint8_dtype_config = DTypeConfig(F32, F32, U8)
weight_only_quint4x2_dtype_config = DTypeConfig(F32, F32, U4X2)
weight_only_qint8_dtype_config = DTypeConfig(F32, F32, I8)

# XNNPACK-compatible symmetric int8: scale >= 2**-12, weights in -127..127
act_qint8_scale_min_2_neg_12 = DTypeWithConstraints(dtype=I8, scale_min_lower_bound=2**-12)
weight_qint8_neg_127_to_127_scale_min_2_neg_12 = DTypeWithConstraints(
    dtype=I8, quant_min_lower_bound=-127, quant_max_upper_bound=127, scale_min_lower_bound=2**-12)
weighted_op_qint8_symmetric_dtype_config = DTypeConfig(
    act_qint8_scale_min_2_neg_12, act_qint8_scale_min_2_neg_12, weight_qint8_neg_127_to_127_scale_min_2_neg_12, F32)
default_op_qint8_symmetric_dtype_config = DTypeConfig(act_qint8_scale_min_2_neg_12, act_qint8_scale_min_2_neg_12)
dynamic_qint8_symmetric_dtype_config = DTypeConfig(
    act_qint8_scale_min_2_neg_12, F32, weight_qint8_neg_127_to_127_scale_min_2_neg_12, F32, is_dynamic=True)

# TensorRT: int8 everywhere
weighted_op_qint8_dtype_config = DTypeConfig(I8, I8, I8, F32)
non_weighted_op_qint8_dtype_config = DTypeConfig(I8, I8)

# fixed-qparams ops: output range [0, 1] (sigmoid, ...) or [-1, 1] (tanh)
FIXED_QPARAMS_0_TO_1 = DTypeWithConstraints(dtype=U8, quant_min_lower_bound=0, quant_max_upper_bound=255,
                                            scale_exact_match=1.0 / 256.0, zero_point_exact_match=0)
FIXED_QPARAMS_NEG1_TO_1 = DTypeWithConstraints(dtype=U8, quant_min_lower_bound=0, quant_max_upper_bound=255,
                                               scale_exact_match=2.0 / 256.0, zero_point_exact_match=128)
