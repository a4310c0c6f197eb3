import pytest
import torch

from fxquant._dtypes import dtype_range, normalize_dtype


@pytest.mark.parametrize("legacy,plain", [("quint8", torch.uint8), ("qint8", torch.int8), ("qint32", torch.int32)])
def test_legacy_dtypes_map_to_plain(legacy, plain):
    assert normalize_dtype(getattr(torch, legacy)) is plain
    assert normalize_dtype(plain) is plain


def test_ranges():
    assert dtype_range(torch.uint8) == (0, 255)
    assert dtype_range(torch.uint8, reduce_range=True) == (0, 127)
    assert dtype_range(torch.int8, reduce_range=True) == (-64, 63)
    with pytest.raises(ValueError, match="float32"):
        dtype_range(torch.float32)
