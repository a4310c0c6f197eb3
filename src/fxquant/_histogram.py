"""Histogram bookkeeping and the L2 clipping-range search of :class:`fxquant.observer.HistogramObserver`.

Both reproduce torch.ao's HistogramObserver bit for bit.

* :func:`merge_histograms` folds a new batch into the running histogram with torch.ao's rules (same range: add;
  the old range a single point: drop it into one bin; otherwise spread the old histogram, upsampled 16 times,
  over the new range).
* :func:`l2_clip_bins` finds the clipping range. torch.ao walks quantile bounds ``alpha`` / ``beta`` in steps of
  ``1e-5`` (up to 100 000 Python iterations), evaluating the L2 quantization error of each new candidate range
  with a 2048-element tensor expression and stopping at the first candidate whose error grows. Here the walk is
  split in two: (1) the candidate path depends only on the cumulative histogram, so it is simulated with
  precomputed ``searchsorted`` tables, jumping over runs where nothing changes (at most ``2 * bins`` steps);
  (2) the errors of all candidates are computed as one ``(candidates, bins)`` tensor expression, in chunks,
  with the same float32 operations as torch.ao, so the first increase - and hence the range - is the same.
"""
from __future__ import annotations

import bisect
import functools
import itertools
from typing import Any, Iterator

import numpy as np
import torch

from fxquant._dtypes import normalize_dtype
from fxquant._observer_base import _EPS, UniformQuantizationObserverBase
from fxquant.qparams import is_per_tensor

__all__ = ["HistogramObserver", "histc", "merge_histograms", "l2_clip_bins", "UPSAMPLE_RATE"]

UPSAMPLE_RATE = 16
_OWN_BINNING_MAX_THREADS = 2  # torch.histc runs in parallel; bincount does not
_STEP = 1e-5          # quantile granularity of the walk
_WALK_LEN = 100_010   # alpha + beta steps never exceed 1 / _STEP (+ rounding slack)


def _spread(hist: torch.Tensor, old_min: torch.Tensor, old_max: torch.Tensor, new_min: torch.Tensor,
            new_max: torch.Tensor) -> torch.Tensor:
    """Re-bin ``hist`` (over [old_min, old_max]) onto ``len(hist)`` bins over the wider [new_min, new_max]."""
    bins = hist.numel()
    fine = hist.repeat_interleave(UPSAMPLE_RATE) / UPSAMPLE_RATE
    fine_width = (old_max - old_min) / (bins * UPSAMPLE_RATE)
    centres = torch.linspace(old_min, old_max, bins * UPSAMPLE_RATE + 1, device=old_min.device)[:-1].to(hist.device)
    centres = centres + 0.5 * fine_width
    edges = torch.linspace(new_min, new_max, bins + 1, device=new_min.device).to(hist.device)
    target = (torch.bucketize(centres, edges, right=True) - 1).clamp_(0, bins - 1)
    return torch.bincount(target, weights=fine, minlength=bins)


def histc(x: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """``torch.histc(x, bins, lo, hi)`` for finite float32 ``x`` inside [lo, hi], bit for bit.

    torch's CPU kernel bins ``pos = int((x - left) * bins / (right - left))`` in float32 (``left, right`` =
    ``lo, hi``, or ``lo - 1, hi + 1`` when they are equal; ``pos == bins`` goes to the last bin) and counts in
    float32. On CPU with one or two threads the same float32 expression plus ``bincount`` is about twice as fast;
    counts agree as long as no bin exceeds 2**24 (beyond that torch's float32 counter stops counting and fxquant
    counts on). Elsewhere this calls ``torch.histc``.
    """
    if x.device.type != "cpu" or torch.get_num_threads() > _OWN_BINNING_MAX_THREADS or bins >= 2**24:
        return torch.histc(x, bins, min=lo, max=hi)
    left, right = (lo - 1.0, hi + 1.0) if lo == hi else (lo, hi)
    left32, right32 = np.float32(left), np.float32(right)
    with np.errstate(over="ignore"):
        width = right32 - left32
        overflows = not np.isfinite(width * np.float32(bins))
    if left32 == right32 or overflows:  # a huge constant (+-1 vanishes) or a range near float32's limits:
        return torch.histc(x, bins, min=lo, max=hi)  # torch's float32 arithmetic breaks down; keep its answer
    pos = x - float(left32)
    if bins & (bins - 1) == 0 and np.isfinite(width) and width / bins >= np.finfo(np.float32).tiny:
        pos.div_(float(width / np.float32(bins)))  # a * 2**k / w == a / (w / 2**k): one pass fewer, same bits
    else:
        pos.mul_(float(bins)).div_(float(width))
    counts = torch.bincount(pos.to(torch.int32).reshape(-1), minlength=bins + 1)  # any layout of x
    counts[bins - 1] += counts[bins]  # pos == bins (x == right) belongs to the last bin
    return counts[:bins].to(torch.float32)


def merge_histograms(old_hist: torch.Tensor, old_min: torch.Tensor, old_max: torch.Tensor,
                     batch_hist: torch.Tensor, new_min: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """Running histogram after a batch: ``batch_hist`` is already binned over the new range [new_min, new_max]."""
    if bool(new_min == old_min) and bool(new_max == old_max):
        return old_hist + batch_hist
    if bool(old_min == old_max):
        point = torch.histc(old_min, bins=old_hist.numel(), min=float(new_min), max=float(new_max))
        return point * torch.sum(old_hist) + batch_hist
    return batch_hist + _spread(old_hist, old_min, old_max, new_min, new_max)


@functools.lru_cache(maxsize=1)
def _quantile_walk() -> tuple[list[float], list[float]]:
    """alpha_k and beta_k after k steps, accumulated one step at a time in float64 exactly as a Python loop
    does (``np.cumsum`` adds sequentially)."""
    alphas = np.cumsum(np.concatenate(([0.0], np.full(_WALK_LEN, _STEP))))
    betas = np.cumsum(np.concatenate(([1.0], np.full(_WALK_LEN, -_STEP))))
    return alphas.tolist(), betas.tolist()


def _f32(value: float) -> float:
    """``value`` rounded to float32, as torch does when it compares a float32 tensor with a Python float."""
    return float(np.float32(value))


def _walk(csum: list[float], total: float) -> Iterator[tuple[int, int]]:
    """The candidate (start_bin, end_bin) ranges torch.ao's search visits, in order, assuming none is rejected.

    torch.ao compares the float32 cumulative histogram with ``alpha * total`` rounded to float32; the bins where
    the bounds land are found by bisection, and runs of steps that change nothing are jumped over.
    """
    alphas, betas = _quantile_walk()
    last = len(betas) - 2
    i = j = start = 0
    end = len(csum) - 1
    while alphas[i] < betas[j] and start < end:  # once start == end no later step can move either bound
        left = min(max(bisect.bisect_left(csum, _f32(alphas[i + 1] * total)), start), end)
        right = max(min(bisect.bisect_right(csum, _f32(betas[j + 1] * total)) - 1, end), start)
        if left - start > end - right:
            start, i = left, i + 1
        elif right == end:  # nothing moves until the upper threshold drops below csum[end]: jump there
            target = csum[end]
            j += 1 + bisect.bisect_left(range(j + 1, last + 1), True,
                                        key=lambda k: _f32(betas[k + 1] * total) < target)
            if j > last:
                return
            continue
        else:
            end, j = right, j + 1
        if i > last:
            raise RuntimeError("histogram search ran past its quantile table; please report this")
        yield start, end


def _errors(hist: torch.Tensor, bin_width: float, dst_nbins: int, cands: np.ndarray) -> np.ndarray:
    """L2 quantization error of each candidate (start_bin, end_bin): torch.ao's float32 expression, batched."""
    bins = hist.numel()
    starts = torch.as_tensor(cands[:, :1], device=hist.device)
    widths_f64 = bin_width * (cands[:, 1] - cands[:, 0] + 1).astype(np.float64) / dst_nbins
    dst_w = torch.tensor(widths_f64, dtype=torch.float32, device=hist.device)[:, None]
    half = torch.tensor(widths_f64 / 2, dtype=torch.float32, device=hist.device)[:, None]
    neg_half = torch.tensor(-widths_f64 / 2, dtype=torch.float32, device=hist.device)[:, None]
    density = hist / bin_width
    begin = (torch.arange(bins, device=hist.device)[None, :] - starts) * bin_width
    end = begin + bin_width
    first = torch.clamp(torch.div(begin, dst_w, rounding_mode="floor"), 0, dst_nbins - 1)
    last = torch.clamp(torch.div(end, dst_w, rounding_mode="floor"), 0, dst_nbins - 1)
    d_begin = begin - (first + 0.5) * dst_w
    d_end = end - (last * dst_w + half)
    cube_nh = neg_half * neg_half * neg_half
    norm = torch.zeros_like(begin)
    norm += density * ((half * half * half - d_begin * d_begin * d_begin) / 3)
    norm += (last - first - 1) * (density * ((half * half * half - cube_nh) / 3))
    norm += density * ((d_end * d_end * d_end - cube_nh) / 3)
    errors = norm.sum(dim=1).double().cpu().numpy()
    errors[widths_f64 == 0.0] = 0.0
    return errors


def l2_clip_bins(hist: torch.Tensor, min_val: float, max_val: float, dst_nbins: int,
                 chunk: int = 4) -> tuple[int, int]:
    """First and last histogram bin of the clipping range torch.ao's ``_non_linear_param_search`` picks.

    Args:
        hist: the float32 histogram (``bins`` counts over [min_val, max_val]).
        min_val, max_val: the histogram's range (Python floats of the float32 buffers).
        dst_nbins: number of quantization levels torch.ao assumes (``2 ** bits`` of the dtype).
        chunk: candidates evaluated per tensor expression at first. The search usually stops after a few
            candidates, so chunks start small and double up to ``32768 // bins`` rows (small enough that torch
            runs each op on one thread: on a busy machine, waking the thread pool costs more than the work).
    """
    bins = hist.numel()
    total = torch.sum(hist).item()
    path = _walk(torch.cumsum(hist, dim=0).tolist(), total)
    bin_width = (max_val - min_val) / bins
    best: tuple[int, int] = (0, bins - 1)
    if bin_width == 0.0:  # every error is exactly 0: torch.ao accepts every candidate
        for best in path:
            pass
        return best
    previous, cap = float("inf"), max(1, 32768 // bins)
    while True:
        cands = np.asarray(list(itertools.islice(path, chunk)), dtype=np.int64).reshape(-1, 2)
        if not len(cands):
            return best
        errors = _errors(hist, bin_width, dst_nbins, cands)
        before = np.concatenate(([previous], errors[:-1]))
        worse = np.flatnonzero(errors > before)
        if worse.size:
            k = int(worse[0])
            return (int(cands[k - 1, 0]), int(cands[k - 1, 1])) if k else best
        best, previous = (int(cands[-1, 0]), int(cands[-1, 1])), float(errors[-1])
        chunk = min(chunk * 2, cap)


def _level_count(dtype: torch.dtype) -> int:
    """``2 ** bits`` of the storage dtype: the number of levels torch.ao's search assumes (even with
    reduce_range or a custom range)."""
    plain = normalize_dtype(dtype)
    info = torch.finfo(plain) if plain.is_floating_point else torch.iinfo(plain)
    return 2 ** info.bits


class HistogramObserver(UniformQuantizationObserverBase):
    """Per-tensor observer keeping a running histogram; the range is chosen by L2 error minimisation.

    Args:
        bins: histogram bins (default 2048).
        dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps: see
            :class:`~fxquant.observer.UniformQuantizationObserverBase` (per-tensor qschemes only).
        is_dynamic: not supported (ValueError).

    Buffers: ``eps``, ``histogram`` (``bins`` float32 counts), ``min_val`` / ``max_val`` (0-dim, the histogram's
    range). Histograms and the chosen range are bit-identical to torch.ao's for float32 inputs (other float
    inputs are converted to float32 first). NaN / inf values are dropped with one warning.
    """

    histogram: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, bins: int = 2048, dtype: torch.dtype = torch.uint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None,
                 factory_kwargs: dict[str, Any] | None = None, eps: float = _EPS, is_dynamic: bool = False) -> None:
        if not is_per_tensor(qscheme):
            raise ValueError(f"HistogramObserver supports per_tensor_affine and per_tensor_symmetric, got {qscheme}")
        if is_dynamic:
            raise ValueError("HistogramObserver does not support dynamic quantization (is_dynamic=True)")
        if not (isinstance(bins, int) and bins > 0):
            raise ValueError(f"HistogramObserver: bins must be a positive int, got {bins!r}")
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps, is_dynamic)
        kw = torch.nn.factory_kwargs(factory_kwargs)
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, **kw))
        self.register_buffer("min_val", torch.tensor(float("inf"), **kw))
        self.register_buffer("max_val", torch.tensor(float("-inf"), **kw))
        self.dst_nbins = _level_count(self.dtype)
        self.upsample_rate = UPSAMPLE_RATE

    def _set(self, hist: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.histogram.detach_().resize_(hist.shape).copy_(hist)
        self.min_val.detach_().resize_(lo.shape).copy_(lo)
        self.max_val.detach_().resize_(hi.shape).copy_(hi)

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Add the finite values of ``x_orig`` to the histogram (widening its range if needed); return it."""
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach()
        x = x if x.dtype == torch.float32 else x.float()
        found = self._finite_data(x)
        if found is None:
            return x_orig
        x, lo, hi = found
        if bool(self.min_val == float("inf")) or bool(self.max_val == float("-inf")):
            self._set(histc(x, self.bins, float(lo), float(hi)), lo, hi)
            return x_orig
        new_lo, new_hi = torch.min(self.min_val, lo).detach(), torch.max(self.max_val, hi).detach()
        batch = histc(x, self.bins, float(new_lo), float(new_hi)).to(self.histogram.device)
        merged = merge_histograms(self.histogram, self.min_val, self.max_val, batch, new_lo, new_hi)
        self._set(merged, new_lo, new_hi)
        return x_orig

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale / zero point (shape ``(1,)``) of the L2-optimal clipping range of the histogram."""
        if bool(self.min_val == float("inf")) and bool(self.max_val == float("-inf")):
            return self._default_qparams()
        if self.histogram.numel() != self.bins:
            raise ValueError(f"HistogramObserver: histogram has {self.histogram.numel()} bins but the observer "
                             f"was built with bins={self.bins}")
        start, end = l2_clip_bins(self.histogram, self.min_val.item(), self.max_val.item(), self.dst_nbins)
        width = (self.max_val - self.min_val) / self.bins
        return self._calculate_qparams(self.min_val + width * start, self.min_val + width * (end + 1))

    def reset_min_max_vals(self) -> None:
        """Forget the histogram and its range."""
        self.histogram.zero_()
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        version = local_metadata.get("version")
        for name, empty in (("min_val", float("inf")), ("max_val", float("-inf"))):
            key = prefix + name
            if key not in state_dict:
                continue
            if (version is None or version < 3) and state_dict[key].shape == torch.Size([0]):
                state_dict[key] = torch.tensor(empty)  # uninitialised buffers were (0,)-shaped before version 3
            getattr(self, name).resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}"
