"""File helpers: write atomically so a crash never leaves a half-written file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import BadModelFileError, DiskFullError, disk_error, is_disk_error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename, on error (a second
    Ctrl-C included) it is removed and ``path`` is left as it was. A write that failed for lack of space or an
    I/O error becomes a :class:`~longalign_core.errors.DiskFullError` naming ``path`` and the free space."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_error(exc):
            raise disk_error(path, exc) from None
        raise
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_error(exc):
            raise disk_error(path, exc) from None
        raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (whole rows of a log) to ``path`` in one write, flushed; if the write fails (a full disk,
    a second Ctrl-C) the file is cut back to its old length, so no half row is left, and a disk failure is a
    :class:`~longalign_core.errors.DiskFullError` naming ``path``."""
    path, data = Path(path), text.encode("utf-8")
    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing is left to flush when it fails
        size = f.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[f.write(view):]
        except BaseException as exc:
            with contextlib.suppress(OSError):
                f.truncate(size)
            if isinstance(exc, Exception) and is_disk_error(exc):
                raise disk_error(path, exc) from None
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def read_json_file(path: str | os.PathLike, what: str, fix: str) -> dict:
    """The JSON object in ``path``; a damaged file (not UTF-8, not JSON, not an object) is a
    :class:`~longalign_core.errors.BadInputError` naming it, the place and ``fix`` (never a decoding traceback)."""
    import json

    from .errors import BadInputError

    data = Path(path).read_bytes()
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}:{data[:exc.start].count(b'{chr(10)}') + 1}: {what} is damaged (not UTF-8 text "
                            f"at byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}:{exc.lineno}: {what} is damaged (not valid JSON: {exc.msg} at column "
                            f"{exc.colno}); {fix}") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{path}: {what} is damaged (a JSON {type(value).__name__}, not an object); {fix}")
    return value


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a fully written folder ``tmp`` to ``final`` in one rename; if another process published ``final``
    first, keep theirs and drop ``tmp``. Readers never see a half-written folder."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_jsonl_records(path: str | os.PathLike, what: str = "JSONL file", option: str | None = None
                       ) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; a line that is not a JSON object is
    an error naming the file, the line and the column."""
    import json

    from .errors import BadInputError, kind_of, read_text_file

    records = []
    for n, line in enumerate(read_text_file(path, what, option).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno}); each line of a "
                                f".jsonl file must be one JSON object such as {{\"prompt\": \"...\"}}") from None
        if not isinstance(record, dict):
            raise BadInputError(f"{path}:{n}: expected a JSON object such as {{\"prompt\": \"...\"}}, found "
                                f"{kind_of(record)}")
        records.append((n, record))
    return records


def read_jsonl_texts(path: str | os.PathLike, fallback_key: str = "caption", option: str | None = None,
                     allow_empty: bool = True, field: str | None = None) -> list[str]:
    """The ``field`` string of every record of a JSONL file (by default ``prompt``, else ``fallback_key``); a bad
    line, a record without the field, or a prompt that is not a string (or, without ``allow_empty``, is empty
    or only spaces), is an error naming the file and line."""
    from .errors import BadInputError, kind_of

    texts = []
    for n, record in read_jsonl_records(path, "prompts file", option):
        key = field or ("prompt" if "prompt" in record else fallback_key)
        if key not in record:
            present = ", ".join(repr(k) for k in list(record)[:12]) + (", …" if len(record) > 12 else "")
            if field:
                raise BadInputError(f"{path}:{n}: no {field!r} field (--prompt-field {field}); the fields on this "
                                    f"line: {present or 'none'}. Name the prompt's field with --prompt-field")
            raise BadInputError(f"{path}:{n}: expected an object with a 'prompt' (or '{fallback_key}') string, "
                                f"found keys {sorted(record)[:5]}")
        text = record[key]
        if not isinstance(text, str):
            raise BadInputError(f"{path}:{n}: '{key}' is {kind_of(text)} ({json_preview(text)}), not a "
                                f"string; quote it")
        if not allow_empty and not text.strip():
            raise BadInputError(f"{path}:{n}: '{key}' is empty{' (only spaces)' if text else ''}: every training "
                                f"prompt needs text; fill it in or remove the line")
        texts.append(text)
    if not texts:
        raise BadInputError(f"{path} holds no prompts (empty, or only blank lines)")
    return texts


def json_preview(value, limit: int = 40) -> str:
    """A short JSON rendering of ``value`` for error messages."""
    import json

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class CheckpointError(BadModelFileError):
    """A checkpoint file is unreadable, or holds pickled objects other than tensors."""


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load`` that never executes code from the file (``weights_only=True``), with a clear error: a
    missing, empty or truncated file, or one holding pickled code, is a :class:`CheckpointError` naming it."""
    import pickle

    import torch

    from .errors import check_input_file

    path = check_input_file(path, what, error=CheckpointError)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} contains pickled Python objects other than tensors, so it was not loaded (loading it could "
            f"run code). Use a .safetensors file or a plain tensor state dict. ({str(exc).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint (truncated or corrupt: "
                              f"{detail}); download or export it again") from None
