"""The ``fxquant`` command line (also ``python -m fxquant``).

    fxquant demo [--quick]                                   train, quantize and measure a digits CNN (offline)
    fxquant quantize --model pkg.mod:factory --calib pkg.mod:batches [--backend x86] [--qconfig default]
                     [--skip NAME_OR_REGEX ...] [--out model.fxq] [--report report.html]
    fxquant explain model.fxq [--only-float]                 what was quantized, and why the rest was not
    fxquant native [--rebuild]                               build / check the native FBGEMM kernels

Mistakes in what the user gave (a bad import path, data of the wrong shape, an untraceable model, an unreadable
file) print one or two lines with the fix and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"fxquant: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands demo, quantize, explain, native)."""
    from .tools.presets import BACKENDS, PRESETS

    parser = _Parser(prog="fxquant", description="FX graph mode quantization for PyTorch on plain dtypes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="train a small CNN on the 8x8 digits, quantize it, compare float vs int8")
    demo.add_argument("--quick", action="store_true", help="2 epochs and few timing repeats (seconds)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default 6, --quick 2)")
    demo.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("quantize", help="quantize your model: import, prepare, calibrate, convert, save, report")
    q.add_argument("--model", required=True, metavar="PKG.MOD:FACTORY",
                   help="function returning the float model (or (model, example_inputs))")
    q.add_argument("--calib", required=True, metavar="PKG.MOD:BATCHES",
                   help="list of batches, or a function returning an iterable of batches (tensor or tuple each)")
    q.add_argument("--backend", default="x86", choices=BACKENDS)
    q.add_argument("--qconfig", default="default", choices=PRESETS)
    q.add_argument("--skip", nargs="+", default=[], metavar="NAME_OR_REGEX",
                   help="leave these modules in float (exact module path, or a regex matched from the start)")
    q.add_argument("--non-traceable", nargs="+", default=[], metavar="MODULE_PATH",
                   help="submodules torch.fx cannot trace (data-dependent control flow): they run in float")
    q.add_argument("--calib-batches", type=int, default=None, metavar="N", help="use only the first N batches")
    q.add_argument("--out", default=None, help="save the quantized model here (load with fxquant.tools.serialize)")
    q.add_argument("--report", default=None, help="write the per-layer HTML report here")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    e = sub.add_parser("explain", help="list what a saved model quantized and why the rest stayed float")
    e.add_argument("path", help="a file written by fxquant quantize --out / fxquant.tools.serialize.save")
    e.add_argument("--only-float", action="store_true", help="show only the ops left in float")
    e.add_argument("--trust", nargs="+", default=[], metavar="PKG.MOD:CLASS",
                   help="import these classes of yours and allow them in the file (fxquant.tools.serialize."
                        "register_safe)")
    n = sub.add_parser("native", help="build (once per torch install) and check the native FBGEMM kernels")
    n.add_argument("--rebuild", action="store_true", help="compile again even if a build is cached")
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import format_result, run_demo

    if args.epochs is not None and args.epochs < 1:
        raise _user_error("--epochs must be at least 1")
    result = run_demo(quick=args.quick, seed=args.seed, epochs=args.epochs)
    print()
    print(format_result(result))
    return 0


def _writable(path: Optional[str], flag: str) -> None:
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise _user_error(f"{flag} {path!r}: directory {directory!r} does not exist or is not writable")


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .tools.quantize_cmd import QuantizeOptions, run_quantize

    _writable(args.out, "--out")
    _writable(args.report, "--report")
    if args.calib_batches is not None and args.calib_batches < 1:
        raise _user_error("--calib-batches must be at least 1")
    run_quantize(QuantizeOptions(model=args.model, calib=args.calib, out=args.out, report=args.report,
                                 backend=args.backend, qconfig=args.qconfig, skip=list(args.skip),
                                 calib_batches=args.calib_batches, non_traceable=list(args.non_traceable),
                                 progress=not args.no_progress))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .tools.explain import explain, format_explain
    from .tools.serialize import load

    from .tools.serialize import register_safe
    from .tools.userload import import_object

    if not os.path.isfile(args.path):
        raise _user_error(f"no such file: {args.path!r}")
    for spec in args.trust:
        register_safe(import_object(spec, "--trust"))
    print(format_explain(explain(load(args.path)), only_float=args.only_float))
    return 0


def _user_error(message: str) -> Exception:
    from .tools.userload import UserInputError

    return UserInputError(message)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .tools.serialize import ModelFileError, UnsafeReferenceError
    from .tools.userload import UserInputError

    return (UserInputError, ModelFileError, UnsafeReferenceError)


def _cmd_native(args: argparse.Namespace) -> int:
    from .kernels import native

    state = native.build(force=args.rebuild)
    if state == "available":
        print(f"native kernels: available ({native.library_path()})")
        return 0
    print(f"native kernels: not used: {state}\n  (the onednn / aten kernels run instead: same results within one "
          f"quantization step, slower at small batches)")
    return 1


_COMMANDS = {"demo": _cmd_demo, "quantize": _cmd_quantize, "explain": _cmd_explain, "native": _cmd_native}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except _user_error_types() as exc:
        hint = ""
        if type(exc).__name__ == "UnsafeReferenceError" and args.command == "explain":
            hint = " (command line: fxquant explain FILE --trust PKG.MOD:CLASS)"
        print(f"fxquant {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "scikit-learn" in str(exc):  # the demo's data set is missing
            print(f"fxquant {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
