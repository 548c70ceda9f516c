"""File helpers: write atomically so a crash never leaves a half-written file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename, on error it is
    removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def read_jsonl_texts(path: str | os.PathLike, fallback_key: str = "caption") -> list[str]:
    """The ``prompt`` (else ``fallback_key``) string of every record of a JSONL file; a bad line is an error
    naming the file and line."""
    import json

    from .errors import BadInputError

    texts = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}:{n}: not a JSON record ({exc.msg} at column {exc.colno}); each line must "
                                f"be an object such as {{\"prompt\": \"A red fox. A blue bird.\"}}") from None
        text = record.get("prompt", record.get(fallback_key)) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise BadInputError(f"{path}:{n}: expected an object with a 'prompt' (or '{fallback_key}') string, "
                                f"got {type(text).__name__ if isinstance(record, dict) else type(record).__name__}")
        texts.append(text)
    return texts


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or holds pickled objects other than tensors."""


def safe_torch_load(path: str | os.PathLike):
    """``torch.load`` that never executes code from the file (``weights_only=True``), with a clear error."""
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} contains pickled Python objects other than tensors, so it was not loaded (loading it could "
            f"run code). Use a .safetensors file or a plain tensor state dict. ({str(exc).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {exc}") from None
