"""Load weights in a dtype other than the one their files store, holding one copy of them.

safetensors maps a file, and a tensor read from it is the file's own pages: once read, those pages stay in the
process's memory for as long as any tensor of that mapping is alive. Letting ``from_pretrained(torch_dtype=...)``
cast, or casting a loaded model, therefore holds the stored copy and the cast copy together until the load ends:
2x the weights from fp16 to bf16 (SDXL's UNet: 9.6 GiB for 4.8 GiB of bf16 weights), 3x from fp32.

Here the model is loaded as stored (mapped, not read), and its tensors are then replaced by the file's, read and
cast a chunk at a time, each chunk through a mapping of its own that is closed once the chunk is cast: the peak is
the cast weights plus one chunk. The values are those of ``from_pretrained(torch_dtype=dtype)`` bit for bit
(both are one ``Tensor.to`` of the stored values)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import torch

#: Bytes (as stored) read through one mapping before it is closed.
CHUNK_BYTES = 256 * 2**20

SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _header(path: Path) -> dict[str, tuple[str, int]]:
    """Tensor name -> (safetensors dtype name, bytes), from the file's header (no tensor is read)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as handle:
        for name in handle.keys():
            piece = handle.get_slice(name)
            count = 1
            for n in piece.get_shape():
                count *= n
            dtype = piece.get_dtype()
            size = torch.finfo(SAFETENSORS_DTYPES[dtype]).bits // 8 if dtype in SAFETENSORS_DTYPES else 8
            out[name] = (dtype, count * size)
    return out


def stored_dtype(files: Iterable[str | os.PathLike]) -> torch.dtype | None:
    """The floating dtype holding most of the bytes of ``files`` (safetensors), or None when they hold none."""
    bytes_by_dtype: Counter = Counter()
    for path in files:
        for dtype, size in _header(Path(path)).values():
            if dtype in SAFETENSORS_DTYPES:
                bytes_by_dtype[SAFETENSORS_DTYPES[dtype]] += size
    return bytes_by_dtype.most_common(1)[0][0] if bytes_by_dtype else None


def read_cast(path: str | os.PathLike, dtype: torch.dtype, names: Iterable[str] | None = None,
              chunk_bytes: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for ``names`` (default: all) of a safetensors file in the file's order, floating tensors
    cast to ``dtype``, every tensor a copy of its own (none keeps the file mapped). At most ``chunk_bytes``
    (default :data:`CHUNK_BYTES`) of the file, or one tensor, are mapped and read at a time."""
    from safetensors import safe_open

    chunk_bytes = chunk_bytes or CHUNK_BYTES
    header = _header(Path(path))
    keep = None if names is None else set(names)
    wanted = [n for n in header if keep is None or n in keep]
    chunks, chunk, size = [], [], 0
    for name in wanted:
        if chunk and size + header[name][1] > chunk_bytes:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(name)
        size += header[name][1]
    if chunk:
        chunks.append(chunk)
    for chunk in chunks:
        with safe_open(str(path), "pt") as handle:  # this chunk's own mapping, closed with its last view below
            cast = {}
            for name in chunk:
                stored = handle.get_tensor(name)
                cast[name] = stored.to(dtype, copy=True) if stored.is_floating_point() else stored.clone()
                del stored
        yield from cast.items()
        del cast


def weight_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads in a diffusers or transformers component folder
    (``diffusion_pytorch_model[.fp16].safetensors``, ``model[.fp16].safetensors``, or the shards an index names),
    or ``[]`` when that is not clear-cut (no safetensors, several candidates): the caller then loads as usual."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    tag = f".{variant}." if variant else None
    indexes = [p for p in folder.glob("*.safetensors.index*.json")
               if (tag in p.name if tag else p.name.endswith(".safetensors.index.json"))]
    if len(indexes) == 1:
        try:
            shards = sorted(set(json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []
        files = [folder / s for s in shards]
        return files if files and all(f.is_file() for f in files) else []
    if indexes:
        return []
    singles = [p for p in folder.glob("*.safetensors")
               if (p.name.endswith(f".{variant}.safetensors") if variant else p.name.count(".") == 1)]
    return singles if len(singles) == 1 else []


def recast_from_files(model: torch.nn.Module, files: Iterable[str | os.PathLike], dtype: torch.dtype,
                      chunk_bytes: int | None = None) -> int:
    """Replace each parameter and buffer of ``model`` that ``files`` hold under its own name and shape with the
    file's value cast to ``dtype`` (:func:`read_cast`), then cast what is left; returns how many were replaced."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    replaced: set[str] = set()
    for path in files:
        for name, value in read_cast(path, dtype, tensors, chunk_bytes):  # the names the file holds, in its order
            target = tensors[name]
            if target.shape == value.shape and target.is_floating_point() == value.is_floating_point():
                target.data = value
                replaced.add(name)
    for name, target in tensors.items():  # what the files did not hold (non-persistent buffers, renamed keys)
        if name not in replaced and target.is_floating_point() and target.dtype != dtype:
            target.data = target.data.to(dtype)
    return len(replaced)


def local_component_folder(source: str | os.PathLike, subfolder: str | None = None,
                           cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local folder ``from_pretrained(source, subfolder=...)`` reads: the folder itself, or a Hub id's
    snapshot when it is already in the local cache (None otherwise: nothing is downloaded here)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path / subfolder if subfolder else path
    try:
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        snapshot = Path(snapshot_download(str(source), allow_patterns=[pattern], local_files_only=True,
                                          cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 — not cached, not a Hub id, offline: the plain load decides
        return None
    return snapshot / subfolder if subfolder else snapshot


def from_pretrained_in_dtype(cls, source: str | os.PathLike, dtype: torch.dtype, subfolder: str | None = None,
                             variant: str | None = None, **kwargs):
    """``cls.from_pretrained(source, subfolder=..., torch_dtype=dtype, variant=...)`` (diffusers or transformers)
    with one copy of the weights in memory when the files store another dtype: loaded as stored, then recast from
    the files a chunk at a time (:func:`recast_from_files`). Models that keep some modules in fp32
    (``_keep_in_fp32_modules``) and folders whose files cannot be told load as usual."""
    where = {"subfolder": subfolder} if subfolder else {}
    if variant:
        where["variant"] = variant
    folder = local_component_folder(source, subfolder, kwargs.get("cache_dir")) if dtype.is_floating_point else None
    files = weight_files(folder, variant) if folder is not None else []
    stored = stored_dtype(files) if files else None
    if stored is None or stored == dtype or getattr(cls, "_keep_in_fp32_modules", None):
        return cls.from_pretrained(str(source), torch_dtype=dtype, **where, **kwargs)
    model = cls.from_pretrained(str(source), torch_dtype=stored, **where, **kwargs)  # mapped in place, not read
    if not Path(source).expanduser().is_dir():  # a Hub id: read the files of the revision just loaded
        folder = local_component_folder(source, subfolder, kwargs.get("cache_dir"))
        files = weight_files(folder, variant) if folder is not None else []
    recast_from_files(model, files, dtype)
    return model
