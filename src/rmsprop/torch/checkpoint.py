"""Checkpoints that never lose a step: atomic, self-checking, all-or-nothing.

:func:`save_checkpoint` writes the model, the optimizer and (optionally) an LR scheduler, a
``torch.amp.GradScaler`` and any extra picklable-by-``weights_only`` data to one file;
:func:`load_checkpoint` restores them.

Guarantees:

* **Atomic.** The file is written to a temporary file in the same directory, flushed and
  ``fsync``-ed, then renamed over the target with :func:`os.replace` (atomic on POSIX and
  Windows) and the directory is ``fsync``-ed so the rename itself survives a power loss. A process
  killed at any point leaves either the previous checkpoint or the new one, never a mix; at worst
  a stray ``.<name>.*.tmp`` file remains next to it.
* **Self-checking.** The file starts with a magic line and a JSON header holding the format
  version, the payload's length and SHA-256, and a description of what was saved (model and
  optimizer classes, each optimizer parameter's model name, shape and dtype, the optimizer's
  option set). A truncated or corrupted file, a file of another format, or a checkpoint
  whose parameters or option set do not fit the live model/optimizer raises
  :class:`CheckpointError` naming what does not fit.
* **All or nothing.** Everything is validated against the live objects before any
  ``load_state_dict`` is called; if a ``load_state_dict`` still raises, every object is put back
  as it was before the call.
* **Safe to load.** The payload is read with ``torch.load(weights_only=True)``: no arbitrary code
  runs when a checkpoint is opened. ``extra`` may therefore only hold tensors, numbers, strings,
  bytes, ``None`` and lists/tuples/dicts of them (checked when saving).

File layout (version 1)::

    b"RMSPROP-CHECKPOINT\\n"            magic line
    <8-byte big-endian header length>
    <header: UTF-8 JSON>                 {"format_version", "payload_bytes", "payload_sha256",
                                          "description", "torch_version", "rmsprop_version"}
    <payload: torch.save bytes>          {"model", "optimizer", "scheduler", "scaler", "extra"}
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_header", "CheckpointError",
           "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MAGIC = b"RMSPROP-CHECKPOINT\n"
_LEN = struct.Struct(">Q")
# A header larger than this is not ours (it only holds names and shapes): refuse before reading.
_MAX_HEADER = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint cannot be used: corrupt, truncated, of another format, or it does not fit the
    live model/optimizer. Raised before anything is changed."""


# ----------------------------------------------------------------------------------------------
# description of the live objects


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    # remove_duplicate=False so a tied weight is known under every name; the first name wins.
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _describe(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    names = _param_names(model)
    groups = []
    for group in optimizer.param_groups:
        groups.append({
            "params": [{"name": names.get(id(p)), "shape": list(p.shape),
                        "dtype": _dtype_name(p.dtype)} for p in group["params"]],
        })
    return {
        "model_class": type(model).__qualname__,
        "model": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)}
                  for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
        "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        # The optimizer's own option set; keys an LR scheduler adds to the groups (initial_lr,
        # max_lr...) are not part of it, so loading before or after creating one both work.
        "options": sorted(optimizer.defaults),
        "groups": groups,
    }


def _where(group: int, index: int, name: str | None) -> str:
    return f"param group {group}, parameter {index}" + (f" ({name!r})" if name else "")


def _check_fits(saved: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the first few differences between two descriptions."""
    problems: list[str] = []
    # Compared by package and class name: a class that moves between the modules of its
    # package still reads its checkpoints.
    def ident(name: str) -> tuple[str, str]:
        return name.partition(".")[0], name.rpartition(".")[2]

    if ident(saved["optimizer_class"]) != ident(live["optimizer_class"]):
        problems.append(f"optimizer class: checkpoint has {saved['optimizer_class']}, "
                        f"live optimizer is {live['optimizer_class']}")
    s_model, l_model = saved["model"], live["model"]
    missing = [k for k in l_model if k not in s_model]
    unexpected = [k for k in s_model if k not in l_model]
    if missing:
        problems.append(f"model entries missing from the checkpoint: {_few(missing)}")
    if unexpected:
        problems.append(f"checkpoint has model entries the live model lacks: {_few(unexpected)}")
    for k in l_model:
        if k in s_model and s_model[k] != l_model[k]:
            problems.append(f"model entry {k!r}: checkpoint has shape {tuple(s_model[k]['shape'])}"
                            f" {s_model[k]['dtype']}, live model has "
                            f"{tuple(l_model[k]['shape'])} {l_model[k]['dtype']}")
    s_groups, l_groups = saved["groups"], live["groups"]
    if len(s_groups) != len(l_groups):
        problems.append(f"param groups: checkpoint has {len(s_groups)}, live optimizer has "
                        f"{len(l_groups)}")
    # Options the live optimizer has and the checkpoint lacks (added by a later version) take
    # their defaults on load; options it does not know would be silently dropped: refused.
    extra = sorted(set(saved["options"]) - set(live["options"]))
    if extra:
        problems.append(f"optimizer option set differs (options unknown to the live "
                        f"optimizer: {extra})")
    for gi, (sg, lg) in enumerate(zip(s_groups, l_groups)):
        if len(sg["params"]) != len(lg["params"]):
            problems.append(f"param group {gi}: checkpoint has {len(sg['params'])} parameters, "
                            f"live optimizer has {len(lg['params'])}")
            continue
        for pi, (sp, lp) in enumerate(zip(sg["params"], lg["params"])):
            if sp["name"] != lp["name"]:
                problems.append(f"{_where(gi, pi, lp['name'])}: checkpoint holds model parameter "
                                f"{sp['name']!r} here (parameters reordered?)")
            elif sp["shape"] != lp["shape"] or sp["dtype"] != lp["dtype"]:
                problems.append(f"{_where(gi, pi, lp['name'])}: checkpoint has shape "
                                f"{tuple(sp['shape'])} {sp['dtype']}, live parameter has "
                                f"{tuple(lp['shape'])} {lp['dtype']}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise CheckpointError("checkpoint does not fit the live model/optimizer:\n  "
                              + "\n  ".join(shown))


def _few(items: list[str], n: int = 5) -> str:
    head = ", ".join(repr(x) for x in items[:n])
    return head + (f" and {len(items) - n} more" if len(items) > n else "")


def _check_payload(payload: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   saved: Mapping[str, Any]) -> None:
    """Check the unpickled payload itself against the live objects (the header could describe a
    different payload only if both were forged, but the check is cheap)."""
    if not isinstance(payload, dict) or not {"model", "optimizer"} <= payload.keys():
        raise CheckpointError("checkpoint payload is not a model/optimizer checkpoint")
    live_model = model.state_dict()
    for k, v in payload["model"].items():
        lv = live_model.get(k)
        if isinstance(v, torch.Tensor) and isinstance(lv, torch.Tensor) and v.shape != lv.shape:
            raise CheckpointError(f"model entry {k!r}: checkpoint tensor has shape "
                                  f"{tuple(v.shape)}, live model has {tuple(lv.shape)}")
    osd = payload["optimizer"]
    if not isinstance(osd, dict) or "state" not in osd or "param_groups" not in osd:
        raise CheckpointError("checkpoint optimizer entry is not an optimizer state_dict")
    live_params = [p for g in optimizer.param_groups for p in g["params"]]
    live_groups = [g for g in optimizer.param_groups for _ in g["params"]]
    names = [p["name"] for g in saved["groups"] for p in g["params"]]
    # our optimizer's state is checked by each param's codec (a quantized one stores codes
    # and scales, not param-shaped tensors); any other optimizer's by shape
    codec_of = getattr(optimizer, "_codec", None)
    for index, st in osd["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(live_params):
            raise CheckpointError(f"optimizer state refers to parameter index {index!r}, but the "
                                  f"live optimizer has {len(live_params)} parameters")
        p = live_params[index]
        label = (f"parameter {index}"
                 + (f" ({names[index]!r})" if index < len(names) and names[index] else ""))
        if codec_of is not None and isinstance(st, dict):
            from ._codecs import STATE_KEYS

            codec = codec_of(live_groups[index], p)
            for key in STATE_KEYS:
                why = codec.check(key, st, p)
                if why:
                    raise CheckpointError(f"optimizer state {key!r} of {label} {why}")
            continue
        for key, value in st.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            shapes = {tuple(p.shape)}
            if p.is_complex():  # state kept as view_as_real pairs
                shapes.add(tuple(p.shape) + (2,))
            if tuple(value.shape) not in shapes:
                raise CheckpointError(f"optimizer state {key!r} of {label} has shape "
                                      f"{tuple(value.shape)}, live parameter has "
                                      f"{tuple(p.shape)}")


# ----------------------------------------------------------------------------------------------
# weights_only-safe extra data

_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype,
            torch.Size, torch.device)


def _check_loadable(obj: Any, path: str = "extra") -> None:
    if isinstance(obj, _SCALARS):
        return
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _check_loadable(x, f"{path}[{i}]")
        return
    if isinstance(obj, dict):
        for k, x in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"{path} has a key of type {type(k).__name__}; checkpoints are "
                                "loaded with torch.load(weights_only=True), which only accepts "
                                "str/int/float/bool/None keys")
            _check_loadable(x, f"{path}[{k!r}]")
        return
    raise TypeError(f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints "
                    "are loaded with torch.load(weights_only=True), so extra may only hold "
                    "tensors, numbers, strings, bytes, None and lists/tuples/dicts of them")


# ----------------------------------------------------------------------------------------------
# save


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, *, scheduler: Any = None,
                    scaler: Any = None, extra: Any = None) -> None:
    """Write ``model``, ``optimizer`` (and ``scheduler``, ``scaler``, ``extra``) to ``path``
    atomically.

    The bytes go to a temporary file in the same directory (so the final rename cannot cross a
    filesystem), which is flushed and ``fsync``-ed before :func:`os.replace` renames it over
    ``path``; the directory is then ``fsync``-ed. Killing the process at any point leaves the
    previous file at ``path`` untouched or the complete new one.

    Args:
        path: destination file; its directory must exist.
        model: the ``nn.Module`` whose ``state_dict()`` is saved.
        optimizer: any ``torch.optim.Optimizer`` (``rmsprop.torch.RMSprop`` or another).
        scheduler: optional object with ``state_dict()`` / ``load_state_dict()`` (LR scheduler).
        scaler: optional ``torch.amp.GradScaler``.
        extra: optional data (epoch, RNG states, metrics...) made of tensors, numbers, strings,
            bytes, ``None`` and lists/tuples/dicts of them; returned by :func:`load_checkpoint`.

    Raises:
        TypeError: ``extra`` holds something ``torch.load(weights_only=True)`` would refuse.
        OSError: the file cannot be written (the previous checkpoint is left as it was).
    """
    _check_loadable(extra)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "extra": extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getbuffer()
    from .. import __version__ as rmsprop_version

    header = json.dumps({
        "format_version": FORMAT_VERSION,
        "payload_bytes": len(data),
        "payload_sha256": hashlib.sha256(data).hexdigest(),
        "description": _describe(model, optimizer),
        "has": {k: payload[k] is not None for k in ("scheduler", "scaler")},
        "torch_version": torch.__version__,
        "rmsprop_version": rmsprop_version,
    }, sort_keys=True).encode("utf-8")

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write checkpoint {path!r}: it is a "
                                "folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as e:  # named by the target, not by the temporary file's name
        why = "its folder does not exist" if not os.path.isdir(directory) else e.strerror
        raise OSError(e.errno, f"cannot write checkpoint {path!r}: {why}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC)
            f.write(_LEN.pack(len(header)))
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    # Makes the rename durable. Not possible on Windows (directories cannot be opened), where
    # NTFS journals the rename itself.
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# load


def _read(path: str) -> tuple[dict[str, Any], bytes]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path!r}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path!r} is a folder, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path!r} cannot be read: {e.strerror or e}") from None
    with f:
        magic = f.read(len(_MAGIC))
        if magic != _MAGIC:
            if magic.startswith(b"PK"):
                hint = " (it looks like a plain torch.save file; load it with torch.load)"
            elif _MAGIC.startswith(magic):
                hint = " (the file is truncated inside its first line)"
            else:
                hint = ""
            raise CheckpointError(f"{path!r} is not an rmsprop checkpoint{hint}")
        raw_len = f.read(_LEN.size)
        if len(raw_len) != _LEN.size:
            raise CheckpointError(f"{path!r} is truncated: the header length is incomplete")
        (n,) = _LEN.unpack(raw_len)
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path!r} is corrupt: implausible header length {n}")
        raw = f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{path!r} is truncated: header has {len(raw)} of {n} bytes")
        try:
            header = json.loads(raw.decode("utf-8"))
            version = header["format_version"]
            size = int(header["payload_bytes"])
            digest = header["payload_sha256"]
            _check_description(header["description"])
            if size < 0 or not isinstance(digest, str) or not isinstance(header.get("has", {}),
                                                                         dict):
                raise ValueError("payload_bytes, payload_sha256 or has")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path!r} is corrupt: its header cannot be read "
                                  f"({type(e).__name__}: {e})") from None
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path!r} has checkpoint format version {version!r}; this "
                                  f"version of rmsprop reads version {FORMAT_VERSION}")
        data = f.read(size + 1)
    if len(data) < size:
        raise CheckpointError(f"{path!r} is truncated: payload has {len(data)} of {size} bytes")
    if len(data) > size:
        raise CheckpointError(f"{path!r} is corrupt: trailing bytes after the payload")
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path!r} is corrupt: payload SHA-256 does not match the header")
    return header, data


def _check_description(d: Any) -> None:
    """Raise (KeyError, TypeError, ValueError) unless ``d`` has the shape :func:`_describe`
    writes, so that a damaged header is refused as such and not as a confusing mismatch:
    the header is not covered by the payload hash."""
    def entry(x: Any) -> None:
        if not isinstance(x["shape"], list) or not isinstance(x["dtype"], str):
            raise TypeError("shape or dtype")
    if not isinstance(d["optimizer_class"], str) or not isinstance(d["options"], list):
        raise TypeError("optimizer_class or options")
    for x in d["model"].values():
        entry(x)
    if not isinstance(d["groups"], list):
        raise TypeError("groups")
    for g in d["groups"]:
        for x in g["params"]:
            entry(x)
            if not (x["name"] is None or isinstance(x["name"], str)):
                raise TypeError("param name")


def read_checkpoint_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's JSON header (format version, payload hash, description of the saved
    model/optimizer), after checking the payload's length and hash; nothing is unpickled."""
    return _read(os.fspath(path))[0]


def _snapshot(obj: Any) -> Any:
    # state_dict() of modules/optimizers returns references to live tensors: clone them so the
    # snapshot survives an in-place load.
    return copy.deepcopy(obj.state_dict())


def load_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, *, scheduler: Any = None,
                    scaler: Any = None, map_location: Any = "cpu") -> Any:
    """Restore what :func:`save_checkpoint` wrote into the live objects; return ``extra``.

    Order of work: read and verify the file (magic, version, length, SHA-256); compare its
    description with the live model and optimizer (class, every parameter's model name, shape
    and dtype, group count, option set); unpickle with ``torch.load(weights_only=True)``; check
    the payload's tensors against the live parameters; only then call ``load_state_dict`` on the
    model, optimizer, scheduler and scaler. If one of those still raises, all of them are
    restored to their state before the call and the error is re-raised as
    :class:`CheckpointError`.

    Args:
        path: a file written by :func:`save_checkpoint`.
        model, optimizer: the live objects, built the same way as when saving.
        scheduler, scaler: restored when given; an error if given but not in the checkpoint.
        map_location: passed to ``torch.load`` (tensors end up on each parameter's device
            anyway, as ``load_state_dict`` moves them).

    Raises:
        CheckpointError: the file is missing, corrupt, truncated, of another format or version,
            or does not fit the live objects. Nothing has been changed.
    """
    path = os.fspath(path)
    header, data = _read(path)
    saved = header["description"]
    _check_fits(saved, _describe(model, optimizer))
    has = header.get("has", {})
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and not has.get(name):
            raise CheckpointError(f"a {name} was given but {path!r} holds no {name} state")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # the hash matched, so this is a file written by something else
        raise CheckpointError(f"{path!r}: payload cannot be loaded with "
                              f"torch.load(weights_only=True): {e}") from e
    _check_payload(payload, model, optimizer, saved)

    targets = [(name, obj) for name, obj in (("model", model), ("optimizer", optimizer),
                                             ("scheduler", scheduler), ("scaler", scaler))
               if obj is not None]
    before = [(name, obj, _snapshot(obj)) for name, obj in targets]
    done: list[tuple[str, Any, Any]] = []
    try:
        for (name, obj), snap in zip(targets, before):
            done.append(snap)
            obj.load_state_dict(payload[name])
    except Exception as e:
        unrestored = []
        for done_name, obj, state in reversed(done):
            try:
                obj.load_state_dict(state)
            except Exception as again:  # noqa: BLE001 - named in the error below
                unrestored.append(f"{done_name} ({again})")
        if unrestored:
            raise CheckpointError(f"loading the {name} state from {path!r} failed ({e}), and "
                                  f"restoring {', '.join(unrestored)} failed too") from e
        raise CheckpointError(f"loading the {name} state from {path!r} failed ({e}); "
                              "everything was restored to its state before the call") from e
    return payload.get("extra")
