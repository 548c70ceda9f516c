"""Where the align stage's (image, long caption) pairs come from, in the layouts users have:

* a ``datasets`` folder (``save_to_disk``) with an image column (``datasets.Image``) and a caption column;
* a ``datasets`` folder, ``.csv`` or ``.jsonl`` file whose image column holds *paths* (the released LongAlign
  dataset: ``path``, ``caption``), resolved against ``--image-root``, else the file's folder (for a ``datasets``
  folder: the folder itself, then the folder it sits in);
* a folder of images with a ``.txt`` caption beside each (``a.png`` + ``a.txt``: the kohya / OneTrainer layout);
  kohya's repeat folders are honoured: the images of a sub-folder named ``<N>_<name>`` (``10_cat/``) come ``N``
  times in every epoch, as kohya trains them.

Every image (the held-out rows' too) is opened and checked before a model loads (PNG: its checksums; other formats:
decoded at 1/8 scale), so a missing, broken or truncated file is one message naming it and its row.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from longalign_core.errors import BadConfigError, BadInputError

from .data import check_captions, load_dataset_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class PairSource:
    """The rows of a dataset: ``captions[i]`` and how to open image i (``paths[i]``, or row i of ``dataset``'s
    image column); ``where(i)`` names the row for messages."""

    origin: str
    captions: list[str]
    paths: list[Path] | None = None
    dataset: object = None
    image_column: str = "image"
    lines: list[int] | None = None  # line numbers of a CSV / JSONL file
    repeats: list[int] | None = None  # kohya repeat folders: how often each row comes in an epoch

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.origin}:{self.lines[i]}"
        if self.dataset is not None:
            return f"{self.origin}: row {i}"
        return str(self.paths[i])

    def open(self, i: int):
        """Image i as a PIL image (not yet decoded)."""
        from PIL import Image

        if self.paths is not None:
            return Image.open(self.paths[i])
        value = self.dataset[i][self.image_column]
        if isinstance(value, dict):  # an Image column read without decoding: {"bytes", "path"}
            return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        return value


def read_pairs(prompts: str | None, image_column: str, caption_column: str, image_root: str | None) -> PairSource:
    """The align stage's pairs from ``--prompts`` in any of the module's layouts (nothing decoded yet)."""
    if not prompts:
        raise BadConfigError("the align stage needs --prompts: a `datasets` folder, a .csv/.jsonl file with image "
                             "paths and captions, or a folder of images with a .txt caption beside each")
    path = Path(prompts)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _from_datasets(path, image_column, caption_column, image_root)
    if path.is_dir():
        return _from_image_folder(path)
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        return _from_table(path, image_column, caption_column, image_root)
    if not path.exists():
        raise BadConfigError(f"--prompts {path}: no such file or folder")
    raise BadConfigError(f"--prompts {path}: the align stage reads a `datasets` folder, a .csv or .jsonl file, or a "
                         f"folder of images with .txt captions; got a {path.suffix or 'file'} file")


def _columns_or_fail(origin, columns, image_column: str, caption_column: str) -> None:
    for col, opt in ((image_column, "--image-column"), (caption_column, "--caption-column")):
        if col not in columns:
            raise BadInputError(f"{origin} has no column {col!r} (columns: {list(columns)}); set {opt}")


def _resolver(image_root: str | None, *candidates: Path):
    """A function from a stored image path to the file: absolute paths as they are, relative ones under
    ``--image-root`` or the first candidate folder that holds the first of them."""
    roots = [Path(image_root)] if image_root else list(candidates)

    def choose(first: str) -> Path:
        for root in roots:
            if (root / first).exists():
                return root
        return roots[0]

    def resolve(values: list[str]) -> list[Path]:
        relative = next((v for v in values if not Path(v).is_absolute()), None)
        root = choose(relative) if relative is not None else roots[0]
        return [Path(v) if Path(v).is_absolute() else root / v for v in values]

    return resolve


def _from_datasets(folder: Path, image_column: str, caption_column: str, image_root: str | None) -> PairSource:
    import datasets

    ds = load_dataset_folder(folder)
    _columns_or_fail(folder, ds.column_names, image_column, caption_column)
    captions = ds[caption_column]
    check_captions(captions, folder, caption_column)
    captions = [c.replace("\n\n", " ").strip() for c in captions]
    feature = ds.features[image_column]
    if isinstance(feature, datasets.Image):  # decoded in the workers, read undecoded for the check
        return PairSource(str(folder), captions, dataset=ds.cast_column(image_column, datasets.Image(decode=False)),
                          image_column=image_column)
    values = ds[image_column]
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()), None)
    if bad is not None:
        raise BadInputError(f"{folder}: row {bad} of column {image_column!r} is {values[bad]!r}: expected an image "
                            f"(a datasets.Image column) or the path of an image file")
    paths = _resolver(image_root, folder, folder.parent)(values)
    return PairSource(str(folder), captions, paths=paths)


def _from_table(path: Path, image_column: str, caption_column: str, image_root: str | None) -> PairSource:
    from longalign_core.io_utils import read_jsonl_records

    if path.suffix.lower() == ".jsonl":
        records = read_jsonl_records(path, "pairs file", "--prompts")
    else:
        from longalign_core.errors import read_text_file

        reader = csv.DictReader(io.StringIO(read_text_file(path, "pairs file", "--prompts")))
        records = [(n, row) for n, row in enumerate(reader, 2)]
        _columns_or_fail(path, reader.fieldnames or [], image_column, caption_column)
    if not records:
        raise BadInputError(f"{path} holds no rows")
    for n, row in records:
        _columns_or_fail(f"{path}:{n}", row, image_column, caption_column)
        for col in (image_column, caption_column):
            if not isinstance(row[col], str) or not row[col].strip():
                raise BadInputError(f"{path}:{n}: {col!r} is {row[col]!r}: every row needs an image path and a "
                                    f"caption")
    paths = _resolver(image_root, path.parent)([row[image_column] for _, row in records])
    captions = [row[caption_column].replace("\n\n", " ").strip() for _, row in records]
    return PairSource(str(path), captions, paths=paths, lines=[n for n, _ in records])


#: kohya's repeat folder: ``<repeats>_<name>`` directly in the image folder.
KOHYA_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


def kohya_repeats(folder: Path, image: Path) -> int:
    """How often ``image`` comes in an epoch: N when it lies (at any depth) under a sub-folder ``N_name`` of
    ``folder``, as kohya's ``train_data_dir`` reads it; else 1."""
    parts = image.relative_to(folder).parts
    match = KOHYA_REPEAT_FOLDER.match(parts[0]) if len(parts) > 1 else None
    if match is None:
        return 1
    n = int(match.group(1))
    if n == 0:
        raise BadInputError(f"{folder / parts[0]}: a kohya repeat folder with 0 repeats trains none of its images; "
                            f"rename it to 1_{match.group(2)} (or more repeats), or move it out of {folder}")
    return n


def _from_image_folder(folder: Path) -> PairSource:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise BadInputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) and is not a `datasets` "
                            f"folder: give a folder of images with a .txt caption beside each")
    captions = []
    for image in images:
        text = image.with_suffix(".txt")
        if not text.is_file():
            raise BadInputError(f"{image} has no caption file {text.name} beside it: write one (the long "
                                f"caption, UTF-8), or move the image out of {folder}")
        from longalign_core.errors import read_text_file

        caption = read_text_file(text, "caption file").strip()
        if not caption:
            raise BadInputError(f"{text} is empty: every image needs its caption")
        captions.append(caption.replace("\n\n", " "))
    repeats = [kohya_repeats(folder, image) for image in images]
    return PairSource(str(folder), captions, paths=images, repeats=repeats if max(repeats) > 1 else None)


def check_images(source: PairSource, rows) -> list[tuple[int, int]]:
    """(height, width) of every image of ``rows``, each opened and checked before a model loads (in threads: the
    decoders release the GIL): a missing, unreadable or truncated file is a :class:`BadInputError` naming it and
    its row (the first in row order). A PNG's chunk checksums are verified, which finds a file cut short; the
    other formats have none (``verify`` passes a JPEG cut in half), so they are decoded, JPEG at 1/8 scale
    (``draft``: the whole stream is still read). 1024² on this project's test machine: 1.6 ms a PNG, 4.4 ms a
    JPEG."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda i: _check_image(source, i), rows))


def _check_image(source: PairSource, i: int) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with source.open(i) as img:
            w, h = img.size
            if img.format == "PNG":
                img.verify()
            else:
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                img.load()
    except FileNotFoundError:
        raise BadInputError(f"{source.where(i)}: image {source.paths[i]} not found; check the path "
                            f"(relative paths are read under --image-root, else the file's folder)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInputError(f"{source.where(i)}: the image cannot be read ({type(exc).__name__}: {exc}); it is "
                            f"truncated or not an image: replace it or drop the row") from None
    return h, w
