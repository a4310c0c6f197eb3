"""Native kernels: FBGEMM's int8 convolution and single-pass element-wise kernels on plain uint8 tensors.

torch's x86 CPU library links FBGEMM (the engine behind torch.ao's x86 / fbgemm backends) and exports its C++
API. ``_native/fxquant_native.cpp`` calls it on plain buffers -- uint8 channels-last activations, int8 weights,
float scales; no quantized tensor type is involved -- and adds one-pass kernels for quantize, a quantized add, a
squeeze-excite product and a global average pool, which aten needs several passes for. The file is compiled on
first use against the installed torch (``c++``, a few seconds) into a per-user cache and loaded with ctypes; a
call's fixed cost is the ctypes call and the output's allocation, where onednn's int8 ops build their primitive on
every call (``bench/bench_kernels.py --only native``: a 16 -> 8 1x1 conv on a 1x1 image 1.64x fp32's speed
against onednn's 0.52x).

Without a compiler, on a CPU FBGEMM does not support, with ``FXQUANT_NATIVE=0``, or when the build fails,
:func:`available` is False (:func:`status` says why) and the kernel rules use onednn / aten instead: same results
within one quantization step, slower at batch 1. ``FXQUANT_NATIVE_DIR`` moves the cache (default
``$XDG_CACHE_HOME/fxquant/native`` or ``~/.cache/fxquant/native``); ``fxquant native`` builds and reports.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["available", "status", "build", "library_path", "ConvPlan", "DynamicLinearPlan", "StaticLinearPlan", "add",
           "mul_gate", "mean_requantize", "channel_affine", "lookup", "dense", "EmbeddingTable", "max_pool2d", "quantize", "dequantize", "rnn_recurrence", "SOURCE"]

SOURCE = pathlib.Path(__file__).with_name("_native") / "fxquant_native.cpp"
# built into the same library
EXTRA_SOURCES = tuple(SOURCE.with_name(f"fxquant_{name}.cpp") for name in ("rnn", "embedding", "pool", "affine", "float"))
HEADERS = (SOURCE.with_name("fxquant_parallel.h"),)
_ABI_VERSION = 13
# C++20: torch 2.14's FBGEMM headers use concepts and std::bit_cast (torch itself is built as C++20)
_FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None, "why": the reason it is None


def _cache_dir() -> pathlib.Path:
    override = os.environ.get("FXQUANT_NATIVE_DIR")
    if override:
        return pathlib.Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fxquant" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _torch_paths() -> tuple[pathlib.Path, pathlib.Path]:
    root = pathlib.Path(torch.__file__).parent
    return root / "include", root / "lib"


def _library_path(compiler: str) -> pathlib.Path:
    key = hashlib.sha256()
    for source in (SOURCE, *EXTRA_SOURCES, *HEADERS):
        key.update(source.read_bytes())
    key.update(f"{torch.__version__}|{torch.__file__}|{compiler}|{sys.platform}|{_FLAGS}".encode())
    return _cache_dir() / f"fxquant_native_{key.hexdigest()[:16]}.so"


def _compile(compiler: str, target: pathlib.Path) -> None:
    include, lib = _torch_paths()
    if not (include / "fbgemm" / "Fbgemm.h").exists():
        raise RuntimeError(f"this torch ships no FBGEMM headers ({include / 'fbgemm'})")
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}", str(SOURCE),
           *map(str, EXTRA_SOURCES), "-o", tmp,
           f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
            raise RuntimeError(f"{compiler} failed (exit {done.returncode}): " + " | ".join(tail))
        os.replace(tmp, target)  # atomic: concurrent builders (test workers) each install a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> None:
    p, i, f, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
    lib.fxq_abi_version.restype = i
    lib.fxq_cpu_supported.restype = i
    lib.fxq_conv_create.restype = p
    lib.fxq_conv_create.argtypes = [i, i, i, i, p, p, p, p, p, i, p, f, i, f, i, p, i, i, i, i, p]
    lib.fxq_conv_run.restype = i
    lib.fxq_conv_run.argtypes = [p, p, p, i, p, i]
    lib.fxq_conv_input_limit.restype = i
    lib.fxq_conv_input_limit.argtypes = [p]
    lib.fxq_conv_free.restype = None
    lib.fxq_conv_free.argtypes = [p]
    lib.fxq_linear_create.restype = p
    lib.fxq_linear_create.argtypes = [i, i, p, i, p, p, i]
    lib.fxq_linear_dynamic.restype = i
    lib.fxq_linear_dynamic.argtypes = [p, p, p, i, f, i, i]
    lib.fxq_linear_free.restype = None
    lib.fxq_linear_free.argtypes = [p]
    lib.fxq_add_u8.restype = None
    lib.fxq_add_u8.argtypes = [p, p, p, i64, f, f, f, f, f, i]
    lib.fxq_quantize_f32.restype = None
    lib.fxq_quantize_f32.argtypes = [p, p, i64, f, f, f, f, i]
    lib.fxq_quantize_nhwc_f32.restype = None
    lib.fxq_quantize_nhwc_f32.argtypes = [p, p, i64, i64, i64, f, f, f, f, i]
    lib.fxq_dequantize_8bit.restype = None
    lib.fxq_dequantize_8bit.argtypes = [p, p, i64, f, f, i, i]
    lib.fxq_mean_u8.restype = None
    lib.fxq_mean_u8.argtypes = [p, p, i64, i64, i64, i, f, f, f, f]
    lib.fxq_mul_gate_u8.restype = None
    lib.fxq_affine_u8.restype = None
    lib.fxq_affine_u8.argtypes = [p, p, i64, i64, i64, i, p, p, f, f, i]
    lib.fxq_lookup_u8.restype = None
    lib.fxq_lookup_u8.argtypes = [p, p, i64, p, i, i]
    lib.fxq_mul_gate_u8.argtypes = [p, p, p, i64, i64, i64, i, f, f, f, f, f, f, i]
    lib.fxq_qlinear_create.restype = p
    lib.fxq_qlinear_create.argtypes = [i, i, p, i, p, f, i, f, i, p, i, i, i, i]
    lib.fxq_qlinear_run.restype = i
    lib.fxq_qlinear_run.argtypes = [p, p, p, i, i]
    lib.fxq_qlinear_free.restype = None
    lib.fxq_qlinear_free.argtypes = [p]
    lib.fxq_rnn_run.restype = i
    lib.fxq_rnn_run.argtypes = [p, i, p, i64, p, i, i, i, p, p, p, i64, i, i, i]
    lib.fxq_embedding_bag.restype = i
    lib.fxq_embedding_bag.argtypes = [p, p, p, i64, i64, i, p, i64, p, i64, i64, i64, i, p, i64, p, i]
    lib.fxq_max_pool2d_8bit.restype = None
    lib.fxq_max_pool2d_8bit.argtypes = [p, p, i64, i64, i64, i64, i64, i64, i, i, i, i, i, i, i, i, i, i]


def _load() -> ctypes.CDLL:
    if os.environ.get("FXQUANT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise RuntimeError("disabled by FXQUANT_NATIVE=0")
    if sys.platform != "linux" or not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        raise RuntimeError(f"built for x86-64 Linux only (this is {sys.platform}, "
                           f"{torch.backends.cpu.get_cpu_capability()})")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    path = _library_path(compiler)
    failed = path.with_suffix(".failed")  # a failed build is not retried by every process (fxquant native --rebuild)
    if failed.exists():
        raise RuntimeError(failed.read_text().strip() + f" (cached in {failed}; fxquant native --rebuild retries)")
    if not path.exists():
        print(f"fxquant: compiling the native kernels for this torch (once, a few seconds) into {path.parent}",
              file=sys.stderr)
        try:
            _compile(compiler, path)
        except RuntimeError as exc:
            try:
                failed.write_text(str(exc))
            except OSError:
                pass
            raise
    lib = ctypes.CDLL(str(path))
    _bind(lib)
    if lib.fxq_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{path} has another interface version; delete it to rebuild")
    if not lib.fxq_cpu_supported():
        raise RuntimeError("FBGEMM does not support this CPU")
    return lib


def _library() -> ctypes.CDLL | None:
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"], _state["why"] = _load(), "available"
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _state["lib"], _state["why"] = None, str(exc)
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the native kernels are built and usable here (builds them on the first call)."""
    return _library() is not None


def status() -> str:
    """``"available"`` or why the native kernels are not used."""
    _library()
    return str(_state["why"])


def build(force: bool = False) -> str:
    """Build (again, with ``force``) and load the native kernels; returns :func:`status`."""
    with _lock:
        if force:
            compiler = _compiler()
            if compiler is not None:
                _library_path(compiler).unlink(missing_ok=True)
                _library_path(compiler).with_suffix(".failed").unlink(missing_ok=True)
        _state.clear()
    return status()


def library_path() -> pathlib.Path | None:
    """Where the compiled library is (or would be) cached; None without a compiler."""
    compiler = _compiler()
    return None if compiler is None else _library_path(compiler)


def _ints(values: Sequence[int]) -> ctypes.Array:
    return (ctypes.c_int * len(values))(*values)


class _Handle:
    """Owns one object of the native library (FBGEMM's packed weight): freed with the Python object, never pickled
    or copied (the lowered modules rebuild it from their int8 weight)."""

    _handle: int | None = None
    _free: Callable[[int], None]

    def __del__(self) -> None:
        handle, self._handle = self._handle, None
        if handle:
            self._free(handle)

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError(f"a native {type(self).__name__} holds FBGEMM's packed weight: rebuild it, never pickle or "
                        f"copy it")


class ConvPlan(_Handle):
    """An int8 convolution (1/2/3-d) with its weight packed once by FBGEMM.

    ``weight``: int8 ``(out, in / groups, *kernel)`` with symmetric (zero-point 0) scales ``w_scale`` (one, or
    one per output channel). ``__call__`` takes a uint8 batch and returns the uint8 channels-last result
    ``quantize(relu?(conv(dequantize(x)) + bias))`` clamped to ``[low, high]``, or None when ``check_7bit`` is set
    and the input holds a value above ``input_limit``: without VNNI FBGEMM multiplies with ``vpmaddubsw``, which
    sums two uint8 x int8 products of one output channel in int16 (saturating); ``input_limit`` = 32767 / (the
    largest sum of two same-signed weights of one output channel), at least 127 (the caller then runs another
    kernel). ``table`` (256 uint8 values):
    applied to each clamped result -- an activation after the conv with its own output qparams, exactly as a
    separate table lookup would.
    """

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                 input_qparams: tuple[float, int], output_qparams: tuple[float, int], relu: bool,
                 low: int, high: int, check_7bit: bool = True, table: torch.Tensor | None = None) -> None:
        lib = _library()
        if lib is None:
            raise RuntimeError(f"native kernels unavailable: {status()}")
        dims = weight.dim() - 2
        self.out_channels, self.dims = int(weight.shape[0]), dims
        self.kernel, self.stride = list(weight.shape[2:]), list(stride)
        self.padding, self.dilation = list(padding), list(dilation)
        w = weight.movedim(1, -1).contiguous()  # (out, *kernel, in / groups)
        scales = w_scale.detach().float().reshape(-1).contiguous()
        b = None if bias is None else bias.detach().float().contiguous()
        if table is not None and (table.dtype != torch.uint8 or table.shape != (256,)):
            raise ValueError(f"ConvPlan: the activation table must be 256 uint8 values, got {table.dtype} "
                             f"{tuple(table.shape)}")
        t = None if table is None else table.contiguous()
        self._keep = (w, scales, b, t)
        handle = lib.fxq_conv_create(
            dims, int(weight.shape[1]) * groups, self.out_channels, groups, _ints(self.kernel), _ints(self.stride),
            _ints(self.padding + self.padding), _ints(self.dilation), w.data_ptr(), int(scales.numel() > 1),
            scales.data_ptr(), float(input_qparams[0]), int(input_qparams[1]), float(output_qparams[0]),
            int(output_qparams[1]), None if b is None else b.data_ptr(), int(relu), int(low), int(high),
            int(check_7bit), None if t is None else t.data_ptr())
        if not handle:
            raise RuntimeError("FBGEMM could not pack this convolution")
        self._handle = handle
        self.input_limit = int(lib.fxq_conv_input_limit(handle))
        self._free = lib.fxq_conv_free
        self._run = lib.fxq_conv_run
        self._layout = {1: torch.contiguous_format, 2: torch.channels_last, 3: torch.channels_last_3d}[dims]
        self._shapes: dict[torch.Size, tuple[torch.Tensor, ctypes.Array, int]] = {}

    def output_shape(self, shape: Sequence[int]) -> list[int]:
        out = [int(shape[0]), self.out_channels]
        for size, k, s, p, d in zip(shape[2:], self.kernel, self.stride, self.padding, self.dilation):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        shape = x.shape
        known = self._shapes.get(shape)
        if known is None:
            if len(self._shapes) >= 64:  # (many input sizes: keep the newest)
                self._shapes.clear()
            known = self._shapes[shape] = self._prepare(shape)
        proto, image, batch = known
        if self.dims == 1:  # (N, C, L) as (N, L, C) memory: a channels-last 1-d batch
            x, y = x.transpose(1, 2).contiguous(), torch.empty_like(proto)
            done = self._go(x, y, batch, image, shape)
            return y.transpose(1, 2) if done else None
        x, y = x.contiguous(memory_format=self._layout), torch.empty_like(proto)
        return y if self._go(x, y, batch, image, shape) else None

    def _prepare(self, shape: torch.Size) -> tuple[torch.Tensor, ctypes.Array, int]:
        """Per input shape: an empty output to copy the layout of (``empty_like`` is the cheapest allocation), the
        image size as a C array, the batch."""
        out = self.output_shape(shape)
        if self.dims == 1:
            proto = torch.empty([out[0], out[2], out[1]], dtype=torch.uint8)
        else:
            proto = torch.empty(out, dtype=torch.uint8, memory_format=self._layout)
        return proto, _ints(list(shape[2:])), int(shape[0])

    def _go(self, x: torch.Tensor, y: torch.Tensor, batch: int, image: ctypes.Array, shape: Sequence[int]) -> bool:
        if y.numel() == 0:
            return True
        rc = self._run(self._handle, x.data_ptr(), y.data_ptr(), batch, image, torch.get_num_threads())
        if rc not in (0, 1):
            raise RuntimeError(f"FBGEMM convolution failed (status {rc}) on input shape {tuple(shape)}")
        return rc == 0


def _linear_arguments(plan: Any, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
                      ) -> tuple[ctypes.CDLL, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The library and the C-ready (contiguous, float32) weight, scales and bias of a linear plan; sets its sizes."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {status()}")
    plan.out_features, plan.in_features = int(weight.shape[0]), int(weight.shape[1])
    b = None if bias is None else bias.detach().float().contiguous()
    return lib, weight.contiguous(), w_scale.detach().float().reshape(-1).contiguous(), b


class DynamicLinearPlan(_Handle):
    """FBGEMM's dynamic linear (torch.ao's kernel for dynamic quantization on x86) with the weight packed once.

    ``weight``: int8 ``(out, in)``, symmetric scales ``w_scale`` (one, or one per output feature). ``__call__(x,
    scale, zero_point)`` takes float32 ``x`` (rows, in) and the activation qparams (computed by the caller as the
    reference does), quantizes ``x`` while packing it (to 0..255), multiplies exactly in int32 and returns
    ``relu?(s_x * s_w * (q_x - zp) @ W^T + bias)`` in float32.
    """

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> None:
        lib, w, scales, b = _linear_arguments(self, weight, w_scale, bias)
        handle = lib.fxq_linear_create(self.in_features, self.out_features, w.data_ptr(), int(scales.numel() > 1),
                                       scales.data_ptr(), None if b is None else b.data_ptr(), int(relu))
        if not handle:
            raise RuntimeError("FBGEMM could not pack this linear layer")
        self._handle, self._free, self._run = handle, lib.fxq_linear_free, lib.fxq_linear_dynamic

    def __call__(self, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        x = x.contiguous()
        rows = x.numel() // self.in_features
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.float32)
        if rows:
            rc = self._run(self._handle, x.data_ptr(), y.data_ptr(), rows, scale, zero_point, torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"FBGEMM dynamic linear failed (status {rc}) on input shape {tuple(x.shape)}")
        return y


class StaticLinearPlan(_Handle):
    """A static int8 linear layer with its weight packed once by FBGEMM.

    ``weight``: int8 ``(out, in)``, symmetric scales ``w_scale`` (one, or one per output feature). ``__call__(x)``
    takes uint8 ``x`` (..., in) and returns uint8 ``quantize(relu?(dequantize(x) @ W^T + bias))`` clamped to
    ``[low, high]``, or None when ``check_7bit`` is set and the input (or its zero point) exceeds ``input_limit``
    (see :class:`ConvPlan`: the caller then runs another kernel).
    """

    def __init__(self, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_qparams: tuple[float, int], output_qparams: tuple[float, int], relu: bool, low: int,
                 high: int, check_7bit: bool = True) -> None:
        lib, w, scales, b = _linear_arguments(self, weight, w_scale, bias)
        handle = lib.fxq_qlinear_create(self.in_features, self.out_features, w.data_ptr(), int(scales.numel() > 1),
                                        scales.data_ptr(), float(input_qparams[0]), int(input_qparams[1]),
                                        float(output_qparams[0]), int(output_qparams[1]),
                                        None if b is None else b.data_ptr(), int(relu), int(low), int(high),
                                        int(check_7bit))
        if not handle:
            raise RuntimeError("FBGEMM could not pack this linear layer")
        self._handle, self._free, self._run = handle, lib.fxq_qlinear_free, lib.fxq_qlinear_run

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        x = x if x.is_contiguous() else x.contiguous()
        rows = x.numel() // self.in_features
        y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.uint8)
        if not rows:
            return y
        rc = self._run(self._handle, x.data_ptr(), y.data_ptr(), rows, torch.get_num_threads())
        if rc not in (0, 1):
            raise RuntimeError(f"FBGEMM linear failed (status {rc}) on input shape {tuple(x.shape)}")
        return y if rc == 0 else None


def rnn_recurrence(hh: DynamicLinearPlan, gru: bool, gx: torch.Tensor, gx_column: int, batch_sizes: torch.Tensor,
                   reverse: bool, h: torch.Tensor, c: torch.Tensor | None, out: torch.Tensor, out_column: int,
                   quant_min: int, quant_max: int, threads: int = 1) -> None:
    """One direction of a dynamically quantized LSTM (``c`` given) or GRU layer over a (packed) sequence.

    ``gx``: float32 ``(rows, columns)``, the layer's input projection with ``b_ih``; this direction's gates start at
    column ``gx_column`` (4 or 3 blocks of ``hidden``). ``batch_sizes``: int32, the rows of each step (a padded batch:
    all equal). ``h`` / ``c``: float32 ``(batch_sizes.max(), hidden)`` initial state, updated in place to each
    sequence's last state. ``out``: float32 ``(rows, columns)``; the hidden states go to columns ``out_column ...
    + hidden``. Each step quantizes the hidden state's rows to ``[quant_min, quant_max]`` (qparams as the observers
    compute them) and multiplies by ``hh`` (the hidden-to-hidden weights with ``b_hh``) in FBGEMM.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {status()}")
    hidden, gates = int(h.shape[-1]), 3 if gru else 4
    steps = int(batch_sizes.numel())
    for name, t in (("gx", gx), ("out", out), ("h", h)) + ((("c", c),) if c is not None else ()):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.dim() != 2:  # type: ignore[union-attr]
            raise ValueError(f"rnn_recurrence: {name} must be a contiguous 2-d float32 tensor")
    if batch_sizes.dtype != torch.int32 or not batch_sizes.is_contiguous():
        raise ValueError("rnn_recurrence: batch_sizes must be contiguous int32")
    largest = int(batch_sizes.max()) if steps else 0
    total = int(batch_sizes.sum()) if steps else 0
    if (gx.shape[0] != total or out.shape[0] != total or gx_column + gates * hidden > gx.shape[1]
            or out_column + hidden > out.shape[1] or h.shape[0] < largest or hh.in_features != hidden
            or hh.out_features != gates * hidden or (c is not None and c.shape != h.shape) or (c is None) != gru):
        raise ValueError(f"rnn_recurrence: shapes do not fit (gx {tuple(gx.shape)}, out {tuple(out.shape)}, h "
                         f"{tuple(h.shape)}, {steps} steps of {total} rows, hh {hh.out_features}x{hh.in_features})")
    if not steps:
        return
    rc = lib.fxq_rnn_run(hh._handle, int(gru), gx.data_ptr() + 4 * gx_column, gx.shape[1], batch_sizes.data_ptr(),
                         steps, hidden, int(reverse), h.data_ptr(), None if c is None else c.data_ptr(),
                         out.data_ptr() + 4 * out_column, out.shape[1], quant_min, quant_max, threads)
    if rc != 0:
        raise RuntimeError(f"native RNN recurrence failed (status {rc})")


EMBEDDING_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


def _long(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


class EmbeddingTable:
    """``F.embedding_bag`` over a table of uint8 rows (``bits`` 8, or 4: two values per byte, low nibble first)
    dequantized as ``(q - zero_point) * scale`` with float32 ``scale`` / ``zero_point`` per row, in one pass over
    the looked-up rows only (a quarter / an eighth of fp32's bytes per row). Holds the three tensors (so their
    buffers stay valid) and their addresses; :meth:`holds` tells whether it still matches a module's buffers."""

    def __init__(self, table: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dim: int,
                 bits: int) -> None:
        lib = _library()
        assert lib is not None, status()
        width = (dim + 1) // 2 if bits == 4 else dim
        if table.dtype != torch.uint8 or table.dim() != 2 or table.shape[1] != width or not table.is_contiguous():
            raise ValueError(f"EmbeddingTable: table must be contiguous uint8 (rows, {width}) for dim {dim} at "
                             f"{bits} bits; got {table.dtype} {tuple(table.shape)}")
        for name, t in (("scale", scale), ("zero_point", zero_point)):
            if t.dtype != torch.float32 or t.shape != (table.shape[0],) or not t.is_contiguous():
                raise ValueError(f"EmbeddingTable: {name} must be contiguous float32 ({table.shape[0]},)")
        self._run = lib.fxq_embedding_bag
        self.tensors = (table, scale, zero_point)
        self.rows, self.dim, self.bits = int(table.shape[0]), dim, bits
        self._head = (table.data_ptr(), scale.data_ptr(), zero_point.data_ptr(), self.rows, dim, bits)

    def holds(self, table: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
        """Whether this plan was built on these very tensors (buffers replaced since need a new plan)."""
        mine = self.tensors
        return mine[0] is table and mine[1] is scale and mine[2] is zero_point

    def __call__(self, indices: torch.Tensor, offsets: torch.Tensor | None, mode: str,
                 include_last_offset: bool = False, per_sample_weights: torch.Tensor | None = None,
                 padding_idx: int | None = None) -> torch.Tensor | None:
        """``indices``: 1-d with ``offsets``, or 2-d (one bag per row) without; int32 or int64. Raises IndexError
        for an index outside the table and ValueError for bad offsets. Returns None (run ``F.embedding_bag``
        instead) for ``include_last_offset`` with a last offset short of the indices' end, which aten reduces
        inconsistently between modes."""
        if indices.dim() == 2:
            if offsets is not None:
                raise ValueError("embedding_bag: offsets must be None for 2-d indices (each row is one bag)")
            n_bags, bag_len, n_offsets = int(indices.shape[0]), int(indices.shape[1]), 0
        elif indices.dim() == 1 and offsets is not None and offsets.dim() == 1:
            offsets = _long(offsets)
            n_offsets = offsets.numel()
            n_bags, bag_len = max(n_offsets - int(include_last_offset), 0), 0
        else:
            raise ValueError(f"embedding_bag: indices must be 2-d, or 1-d with 1-d offsets; got indices of shape "
                             f"{tuple(indices.shape)} and offsets "
                             f"{None if offsets is None else tuple(offsets.shape)}")
        indices = _long(indices)
        weights = None
        if per_sample_weights is not None:
            if mode != "sum":
                raise ValueError(f"embedding_bag: per_sample_weights need mode='sum' (got {mode!r})")
            weights = per_sample_weights.to(torch.float32).reshape(-1).contiguous()
            if weights.numel() != indices.numel():
                raise ValueError(f"embedding_bag: per_sample_weights has {weights.numel()} values for "
                                 f"{indices.numel()} indices")
        out = torch.empty((n_bags, self.dim), dtype=torch.float32)
        rc = self._run(*self._head, indices.data_ptr(), indices.numel(),
                       None if offsets is None else offsets.data_ptr(), n_offsets, n_bags, bag_len,
                       EMBEDDING_BAG_MODES[mode], None if weights is None else weights.data_ptr(),
                       -1 if padding_idx is None else padding_idx % self.rows, out.data_ptr(),
                       torch.get_num_threads())
        if rc == 0:
            return out
        if rc == 4:
            return None
        if rc == 1:
            raise IndexError(f"embedding_bag: an index is outside the table's {self.rows} rows "
                             f"(min {int(indices.min())}, max {int(indices.max())})")
        if rc == 2:
            raise ValueError("embedding_bag: offsets must start at or above 0, never decrease, and stay within the "
                             f"{indices.numel()} indices")
        raise RuntimeError(f"native embedding_bag failed (status {rc}; bits {self.bits}, mode {mode!r})")


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """aten's pooled output size (``pooling_output_shape``)."""
    span = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = span // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def max_pool2d(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], ceil_mode: bool) -> torch.Tensor | None:
    """``F.max_pool2d`` of a channels-last uint8 / int8 image (N, C, H, W) in one pass (two ints per argument),
    channels-last out; None (run aten's kernel, which reports the error) for arguments aten rejects."""
    lib = _library()
    assert lib is not None
    n, c, h, w = (int(v) for v in x.shape)
    ok = all(k > 0 and s > 0 and d > 0 and 0 <= p <= k // 2 for k, s, p, d in zip(kernel, stride, padding, dilation))
    if not ok:
        return None
    out_h, out_w = (_pool_size(size, k, s, p, d, ceil_mode)
                    for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation))
    if out_h <= 0 or out_w <= 0:
        return None
    out = torch.empty((n, c, out_h, out_w), dtype=x.dtype, memory_format=torch.channels_last)
    lib.fxq_max_pool2d_8bit(x.data_ptr(), out.data_ptr(), n, c, h, w, out_h, out_w, *kernel, *stride, *padding,
                            *dilation, int(x.dtype == torch.int8), torch.get_num_threads())
    return out


def add(a: torch.Tensor, b: torch.Tensor, ka: float, kb: float, c: float, low: int, high: int) -> torch.Tensor:
    """``round(clamp(a * ka + b * kb + c, low, high))`` as uint8, for uint8 ``a`` and ``b`` of the same shape and
    memory layout (dense: contiguous or channels-last)."""
    lib = _library()
    assert lib is not None
    out = torch.empty_like(a)
    lib.fxq_add_u8(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), ka, kb, c, float(low), float(high),
                   torch.get_num_threads())
    return out


def mul_gate(big: torch.Tensor, small: torch.Tensor, k: float, z_big: int, z_small: int, c: float, low: int,
             high: int) -> torch.Tensor:
    """``quantize(dequantize(big) * dequantize(small))`` for a uint8 image ``big`` (N, C, *spatial), contiguous or
    channels-last, and a uint8 gate ``small`` with one value per (N, C): ``(big - zb) * k * (small - zs) + c``
    rounded and clamped (``k = sb * ss / so``, ``c`` = the output zero point)."""
    lib = _library()
    assert lib is not None
    channels_last = not big.is_contiguous()
    out = torch.empty_like(big)
    gate = small.reshape(big.shape[0], big.shape[1]).contiguous()
    positions = math.prod(big.shape[2:])
    lib.fxq_mul_gate_u8(big.data_ptr(), gate.data_ptr(), out.data_ptr(), big.shape[0], big.shape[1], positions,
                        int(channels_last), k, float(z_big), float(z_small), c, float(low), float(high),
                        torch.get_num_threads())
    return out


def channel_affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """``round(clamp(x * a[c] + b[c], low, high))`` as uint8 for a uint8 ``x`` (N, C, *spatial) with channels on
    dim 1 (an eval-mode batch norm requantized: :class:`fxquant.nn.quantized.QuantizedBatchNorm`), ``a`` / ``b``
    float32 with C values; one pass, the result in ``x``'s layout (contiguous or channels-last; other layouts are
    made contiguous first)."""
    lib = _library()
    assert lib is not None
    if not 0 <= low <= high <= 255 or x.dtype != torch.uint8 or x.dim() < 2:
        raise ValueError(f"channel_affine: needs a uint8 (N, C, ...) tensor and 0 <= low <= high <= 255, got "
                         f"{x.dtype} of shape {tuple(x.shape)}, low={low}, high={high}")
    channels_last = not x.is_contiguous() and x.dim() in (4, 5) and x.is_contiguous(
        memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if not channels_last:
        x = x.contiguous()
    out = torch.empty_like(x)
    lib.fxq_affine_u8(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], math.prod(x.shape[2:]),
                      int(channels_last), a.data_ptr(), b.data_ptr(), float(low), float(high), torch.get_num_threads())
    return out


def dense(t: torch.Tensor) -> bool:
    """Contiguous, or a channels-last image / volume: the layouts whose elements fill memory without gaps (the
    element-wise kernels walk them in memory order; ``torch.empty_like`` gives the same layout)."""
    if t.is_contiguous():
        return True
    layout = _CHANNELS_LAST.get(t.dim())
    return layout is not None and t.is_contiguous(memory_format=layout)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def lookup(q: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = table[q[i]]`` (int8 ``q``: ``table[q[i] + 128]``) element by element in memory order, for a
    :func:`dense` 8-bit ``q``, ``out`` of its shape and strides (``torch.empty_like(q, dtype=table.dtype)``) and a
    contiguous 256-entry table of a 1-byte dtype; one pass."""
    lib = _library()
    assert lib is not None
    if q.dtype not in (torch.uint8, torch.int8) or table.element_size() != 1 or table.numel() != 256 or \
            out.dtype != table.dtype or q.shape != out.shape or q.stride() != out.stride() or not dense(q) or \
            not table.is_contiguous():
        raise ValueError(f"native.lookup: needs a dense 8-bit input, an output of its shape and strides and a "
                         f"contiguous 256-entry 1-byte table; got {q.dtype} {tuple(q.shape)} strides {q.stride()}, "
                         f"table {table.dtype} {tuple(table.shape)}, out {out.dtype} {tuple(out.shape)} strides "
                         f"{out.stride()}")
    lib.fxq_lookup_u8(q.data_ptr(), out.data_ptr(), q.numel(), table.data_ptr(),
                      0x80 if q.dtype == torch.int8 else 0, torch.get_num_threads())


def mean_requantize(x: torch.Tensor, a: float, b: float, low: int, high: int) -> torch.Tensor:
    """A global average pool of a uint8 image ``x`` (N, C, H, W), contiguous or channels-last, requantized:
    ``round(clamp(b + mean * a, low, high))`` of shape (N, C, 1, 1) in one pass (aten: a float mean, then three
    ops)."""
    lib = _library()
    assert lib is not None
    n, c = int(x.shape[0]), int(x.shape[1])
    out = torch.empty((n, c, 1, 1), dtype=torch.uint8)
    lib.fxq_mean_u8(x.data_ptr(), out.data_ptr(), n, c, math.prod(x.shape[2:]), int(not x.is_contiguous()), a, b,
                    float(low), float(high))
    return out


_BYTE_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def quantize(x: torch.Tensor, inv_scale: float, zero_point: int, low: int, high: int, dtype: torch.dtype,
             channels_last: bool = False) -> torch.Tensor:
    """``round(clamp(zero_point + x * inv_scale, low, high))`` (half to even; the product rounded before the
    addition) as uint8 / int8 for dense float32 ``x`` (contiguous or channels-last; the result keeps the layout):
    one AVX2 pass where aten needs four. ``channels_last``: a contiguous 4-d ``x`` gives a channels-last result in
    the same pass (aten: quantize, then copy). The caller checks ``x``: float32 on the CPU, :func:`dense`."""
    lib = _library()
    assert lib is not None
    bounds = _BYTE_RANGES.get(dtype)
    if bounds is None or not bounds[0] <= low <= high <= bounds[1]:
        raise ValueError(f"native.quantize: needs uint8 with 0 <= low <= high <= 255 or int8 with -128 <= low <= high "
                         f"<= 127; got {dtype}, low={low}, high={high}")
    if channels_last and x.dim() == 4 and x.is_contiguous() and x.shape[1] > 1:
        n, c, h, w = x.shape
        out = torch.empty((n, c, h, w), dtype=dtype, memory_format=torch.channels_last)
        lib.fxq_quantize_nhwc_f32(x.data_ptr(), out.data_ptr(), n, c, h * w, inv_scale, float(zero_point),
                                  float(low), float(high), torch.get_num_threads())
        return out
    out = torch.empty_like(x, dtype=dtype)
    lib.fxq_quantize_f32(x.data_ptr(), out.data_ptr(), x.numel(), inv_scale, float(zero_point), float(low),
                         float(high), torch.get_num_threads())
    return out


def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32 for a dense uint8 / int8 ``q`` (contiguous or channels-last; the
    result keeps the layout): the reference's arithmetic (an exact difference, one rounding) in one AVX2 pass."""
    lib = _library()
    assert lib is not None
    if q.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"native.dequantize: needs a uint8 / int8 tensor, got {q.dtype}")
    out = torch.empty_like(q, dtype=torch.float32)
    lib.fxq_dequantize_8bit(q.data_ptr(), out.data_ptr(), q.numel(), scale, float(zero_point),
                            int(q.dtype == torch.int8), torch.get_num_threads())
    return out

