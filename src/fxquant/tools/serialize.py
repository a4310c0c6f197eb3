"""Save and load prepared and converted models without pickle: ``fxquant.save(model, path)`` / ``fxquant.load(path)``.

    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs)
    ...calibrate...
    save(prepared, "prepared.fxq")          # convert later, in another process
    quantized = convert_fx(load("prepared.fxq"))
    save(quantized, "model.fxq")
    load("model.fxq")(x)                    # bit-identical to quantized(x)

The file is a zip archive:

* ``fxquant/header.json``: format name and version, fxquant / torch versions, SHA-256 of the two parts below;
* ``fxquant/model.json``: the graph (node list with op / target / args), the module tree (class names, attributes),
  the prepared state convert_fx needs (qconfigs, backend config), as a JSON tree (see ``_codec``);
* ``fxquant/tensors.pt``: every tensor, written by ``torch.save`` and read with ``torch.load(weights_only=True)``.

Loading runs no pickled code: tensors come from torch's safe loader, and every class or function named in the JSON
must be on an allow-list (torch.nn, torch operators, fxquant, or registered with :func:`register_safe`). A model that
holds something else cannot be saved, and the error says what and how to register it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from typing import IO, Any, Union

import torch
from torch import nn

from ._codec import Decoder, Encoder, FormatError
from ._graph_codec import decode_graph_module, encode_graph_module
from ._safe import UnsafeReferenceError, register_safe, unregister_safe

__all__ = ["save", "load", "register_safe", "unregister_safe", "ModelFileError", "UnsafeReferenceError",
           "FORMAT_VERSION"]

FORMAT = "fxquant-model"
FORMAT_VERSION = 1
_HEADER, _MODEL, _TENSORS = "fxquant/header.json", "fxquant/model.json", "fxquant/tensors.pt"

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]


class ModelFileError(ValueError):
    """The file is not an fxquant model file, is corrupt or truncated, or comes from an incompatible version."""


def _fxquant_version() -> str:
    import fxquant

    return str(getattr(fxquant, "__version__", "unknown"))


def _describe(model: nn.Module) -> tuple[dict[str, Any], list[torch.Tensor]]:
    enc = Encoder(graph_module_hook=encode_graph_module, name_only=lambda where: where.endswith(".scope_type"))
    root = enc.enc(model, "model")
    return {"root": root, "objects": enc.objects}, enc.tensors


def save(model: nn.Module, path: PathOrFile) -> None:
    """Write ``model`` (a prepared or converted GraphModule, or any module of allowed classes) to ``path``.

    Raises :class:`UnsafeReferenceError` naming the first object that a safe file cannot hold (a user class that is
    not registered, a lambda, ...), with the call that registers it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save() takes an nn.Module (the prepared or converted model), got {type(model).__name__}")
    description, tensors = _describe(model)
    model_bytes = json.dumps(description, separators=(",", ":")).encode()
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    tensor_bytes = buffer.getvalue()
    header = {"format": FORMAT, "version": FORMAT_VERSION, "fxquant_version": _fxquant_version(),
              "torch_version": torch.__version__, "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
              "tensors_sha256": hashlib.sha256(tensor_bytes).hexdigest(), "tensors": len(tensors)}
    if hasattr(path, "write"):
        _write_zip(path, header, model_bytes, tensor_bytes)  # type: ignore[arg-type]
        return
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            _write_zip(f, header, model_bytes, tensor_bytes)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_zip(f: IO[bytes], header: dict[str, Any], model_bytes: bytes, tensor_bytes: bytes) -> None:
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr(_HEADER, json.dumps(header, indent=1), compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(_MODEL, model_bytes, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(_TENSORS, tensor_bytes, compress_type=zipfile.ZIP_STORED)


def _name(path: PathOrFile) -> str:
    return repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else "the file"


def _read_parts(path: PathOrFile) -> tuple[dict[str, Any], bytes, bytes]:
    name = _name(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if _HEADER not in names:
                raise ModelFileError(f"{name} is not an fxquant model file (no {_HEADER}); a file written by "
                                     f"torch.save loads with torch.load")
            header = json.loads(zf.read(_HEADER))
            _check_header(header, name)
            missing = {_MODEL, _TENSORS} - names
            if missing:
                raise ModelFileError(f"{name} is incomplete: {', '.join(sorted(missing))} missing")
            return header, zf.read(_MODEL), zf.read(_TENSORS)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, UnicodeDecodeError, json.JSONDecodeError,
            ValueError) as exc:
        if isinstance(exc, ModelFileError):
            raise
        raise ModelFileError(f"{name} is not a readable fxquant model file: it is corrupt or truncated ({exc}); "
                             f"save the model again") from exc


def _check_header(header: Any, name: str) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{name} is not an fxquant model file (format {header.get('format')!r})"
                             if isinstance(header, dict) else f"{name} has a malformed header")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{name} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{name} was written by fxquant {header.get('fxquant_version')} in file format "
                             f"{version}; this fxquant ({_fxquant_version()}) reads format {FORMAT_VERSION} or "
                             f"older: upgrade fxquant to load it")


def load(path: PathOrFile, map_location: Any = None) -> nn.Module:
    """Rebuild a model written by :func:`save`; its outputs are bit-identical to the saved model's.

    ``map_location`` is passed to ``torch.load`` (e.g. ``"cpu"``). Raises :class:`ModelFileError` for a corrupt,
    truncated, foreign or newer-version file and :class:`UnsafeReferenceError` for a class or function that is not
    allowed (register trusted user classes with :func:`register_safe` first).
    """
    header, model_bytes, tensor_bytes = _read_parts(path)
    name = _name(path)
    for part, data in (("model", model_bytes), ("tensors", tensor_bytes)):
        if hashlib.sha256(data).hexdigest() != header.get(f"{part}_sha256"):
            raise ModelFileError(f"{name} is corrupt: the {part} part does not match its checksum; save it again")
    try:
        tensors = torch.load(io.BytesIO(tensor_bytes), weights_only=True, map_location=map_location)
        description = json.loads(model_bytes)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad archive
        raise ModelFileError(f"{name}: cannot read its tensors / description ({exc})") from exc
    if not isinstance(tensors, list) or len(tensors) != header.get("tensors"):
        raise ModelFileError(f"{name} is corrupt: tensor table does not match the header")
    return _rebuild(description, tensors, name)


def _rebuild(description: Any, tensors: list[torch.Tensor], name: str) -> nn.Module:
    if not isinstance(description, dict) or not isinstance(description.get("objects"), list):
        raise ModelFileError(f"{name}: malformed model description")
    dec = Decoder(tensors, description["objects"], graph_module_hook=decode_graph_module)
    try:
        model = dec.dec(description["root"])
    except UnsafeReferenceError:
        raise
    except FormatError as exc:
        raise ModelFileError(f"{name}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a class refusing its saved state: report, do not crash obscurely
        raise ModelFileError(f"{name}: could not rebuild the model ({type(exc).__name__}: {exc}); it may come from "
                             f"an incompatible fxquant / torch version") from exc
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{name}: the saved root is a {type(model).__name__}, not a module")
    return model
