"""(image, long caption) pairs for the align stage, from the layouts users have:

* a ``datasets`` folder (``save_to_disk``) with an image column (``datasets.Image``) and a caption column;
* a ``datasets`` folder, ``.csv`` or ``.jsonl`` file whose image column holds *paths* (the released LongAlign
  dataset: ``path``, ``caption``), resolved against ``--image-root``, else the file's folder (for a ``datasets``
  folder: the folder itself, then the folder it sits in);
* a folder of images with a ``.txt`` caption beside each (``a.png`` + ``a.txt``: the kohya / OneTrainer layout);
  kohya's repeat folders are honoured: the images of a sub-folder named ``<N>_<name>`` (``10_cat/``) come ``N``
  times in every epoch, as kohya trains them.

Every image (the held-out rows' too) is opened and checked before a model loads (PNG: its checksums; other formats:
decoded at 1/8 scale), so a missing, broken or truncated file is one message naming it and its row. Images are
decoded by a DataLoader's workers. Each epoch walks the rows without replacement in a seeded order; the position is
a function of the step, so a resumed run continues at exactly the next image. With ``--buckets`` every image goes
to the aspect-ratio bucket of about the training resolution's area nearest its own shape (the usual SDXL 1024²
buckets at 1024), is resized to cover it and centre-cropped, and a micro-batch holds one bucket; SDXL's size/crop
ids are those of the crop really taken.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longalign_core.errors import BadConfigError, BadInputError

from .data import check_captions, load_dataset_folder
from .sampling import sdxl_time_ids

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------------------------
# Where the pairs come from


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


# ------------------------------------------------------------------------------------------------------------
# Buckets


def bucket_resolutions(resolution: int) -> list[tuple[int, int]]:
    """(height, width) buckets of at most ``resolution``² pixels: the square, and for widths from a quarter to
    twice the resolution in steps of 64 px (8 px below 512) the tallest height that keeps the area — the usual
    SDXL list at 1024 (1024×1024, 1152×896 … 2048×512)."""
    step = 64 if resolution >= 512 else 8
    area, lo, hi = resolution * resolution, max(step, resolution // 4), resolution * 2
    found = {((resolution // step) * step,) * 2}
    for width in range(lo, hi + 1, step):
        height = min(hi, (area // width) // step * step)
        if height >= lo:
            found |= {(height, width), (width, height)}
    return sorted(found)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest ``size`` (h, w) on a log scale."""
    aspect = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - aspect))


def cover_and_crop(image, target: tuple[int, int]):
    """Resize ``image`` (a ``(3, H, W)`` tensor) to cover ``target`` (h, w), keeping its aspect ratio, and take
    the centre crop: (pixels, (top, left)). Square targets resize the short side as before."""
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    scale = max(target[0] / h, target[1] / w)  # sizes truncated as torchvision's resize(short side) does
    resized = TF.resize(image, [max(target[0], int(h * scale)), max(target[1], int(w * scale))], antialias=True)
    top, left = (round((n - t) / 2) for n, t in zip(resized.shape[-2:], target))
    return TF.crop(resized, top, left, *target), (top, left)


# ------------------------------------------------------------------------------------------------------------
# The order: epochs without replacement, a function of the step


class BatchOrder:
    """The micro-batches of every (step, micro-batch, process): each epoch shuffles each bucket's rows with the
    seed, cuts them into batches (the last one filled from the bucket's start, so every batch is full) and
    shuffles the batches; epochs follow each other. A step's batches are known from the step alone."""

    def __init__(self, groups: list[list[int]], batch: int, seed: int, processes: int, accumulation: int):
        self.groups = [g for g in groups if g]
        self.batch, self.seed, self.processes, self.accumulation = batch, seed, processes, accumulation
        self.per_epoch = sum(math.ceil(len(g) / batch) for g in self.groups)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch(self, e: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != e:
            rng = np.random.default_rng([self.seed, 0xA11C, e])
            batches = []
            for g in self.groups:
                order = [g[i] for i in rng.permutation(len(g))]
                for start in range(0, len(order), self.batch):
                    chunk = order[start:start + self.batch]
                    batches.append(chunk + order[:self.batch - len(chunk)] * (len(chunk) < self.batch))
            self._epoch = (e, [batches[i] for i in rng.permutation(len(batches))])
        return self._epoch[1]

    def batch_of(self, step: int, micro: int, process: int) -> list[int]:
        k = (step * self.accumulation + micro) * self.processes + process
        e, pos = divmod(k, self.per_epoch)
        return self.epoch(e)[pos]



class StepSampler:
    """A DataLoader batch sampler: one process's micro-batches of :class:`BatchOrder` from ``start_step`` on."""

    def __init__(self, order: BatchOrder, start_step: int, process: int):
        self.order, self.start_step, self.process = order, start_step, process

    def __iter__(self):
        step = self.start_step
        while True:
            for micro in range(self.order.accumulation):
                yield self.order.batch_of(step, micro, self.process)
            step += 1


class AlignDataset(torch.utils.data.Dataset):
    """Row ``i`` as (pixels ``(3, h, w)`` in [0, 1] at its bucket, caption, SDXL time ids ``(6,)``)."""

    def __init__(self, source: PairSource, sizes: dict[int, tuple[int, int]], targets: dict[int, tuple[int, int]]):
        self.source, self.sizes, self.targets = source, sizes, targets

    def __len__(self) -> int:
        return len(self.source.captions)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2 import functional as TF

        target = self.targets[i]
        try:
            with self.source.open(i) as img:
                pixels = TF.to_dtype(TF.to_image(img.convert("RGB")), torch.float32, scale=True)
        except OSError as exc:  # decoding found what the header check could not (a truncated JPEG body)
            # reported by the training process (a worker's exception would arrive wrapped in its traceback)
            return None, f"{self.source.where(i)}: the image cannot be decoded ({exc}); replace it or drop the row", None
        original = tuple(pixels.shape[-2:])
        crop, top_left = cover_and_crop(pixels, target)
        # SDXL's micro-conditioning: the image's real size and where the crop took it from
        return crop, self.source.captions[i], sdxl_time_ids(original, top_left, target)


def collate(items):
    """(images ``(B, 3, h, w)``, captions, time ids ``(B, 6)``), or (None, the first decoding error, None)."""
    broken = next((caption for image, caption, _ in items if image is None), None)
    if broken is not None:
        return None, broken, None
    images, captions, time_ids = zip(*items)
    return torch.stack(images), list(captions), torch.stack(time_ids)


class AlignData:
    """The align stage's data: the pairs (read and caption-checked at once), the training images checked before
    the models load (:meth:`check`), their buckets once the resolution is known (:meth:`bucket`), and the batches
    of a step (:meth:`batch`), decoded by a DataLoader's workers."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.source = read_pairs(cfg.prompts, cfg.image_column, cfg.caption_column, cfg.image_root)
        self.captions = self.source.captions
        self._iter, self._next = None, None

    def describe(self) -> str | None:
        """The kohya repeat folders' effect, for the run's summary (None without them)."""
        if self.source.repeats is None:
            return None
        rows = self.train_rows
        return (f"kohya repeat folders: {len(rows)} training images come {sum(self.source.repeats[i] for i in rows)}"
                f" times per epoch (each <N>_<name> folder's images N times)")

    def check(self, train_rows: list[int]) -> None:
        """Open every image of the dataset, the held-out validation rows' too (a broken file is a broken
        dataset, and another seed or --validation-prompts would train on it); keep the training rows' sizes."""
        self.train_rows = train_rows
        sizes = check_images(self.source, list(range(len(self.captions))))
        self.sizes = {i: sizes[i] for i in train_rows}

    def bucket(self, resolution: int, buckets: bool) -> None:
        """Each training row's target size: the nearest bucket of about ``resolution``² (``buckets``), else the
        ``resolution`` square."""
        rows = self.train_rows
        if buckets:
            self.bucket_sizes = bucket_resolutions(resolution)
            chosen = {i: nearest_bucket(self.sizes[i], self.bucket_sizes) for i in rows}
        else:
            self.bucket_sizes, chosen = [(resolution, resolution)], {i: 0 for i in rows}
        times = self.source.repeats or [1] * len(self.captions)  # kohya repeat folders: a row per repeat
        self.groups = [[i for i in rows if chosen[i] == b for _ in range(times[i])]
                       for b in range(len(self.bucket_sizes))]
        self.dataset = AlignDataset(self.source, self.sizes, {i: self.bucket_sizes[chosen[i]] for i in rows})

    def batch(self, step: int, micro: int, process: int, processes: int):
        """The micro-batch ``micro`` of ``step`` for ``process``: (images, captions, time ids). The loader follows
        the steps in order; asked for another position (a resume, a dry run) it starts again there."""
        cfg = self.cfg
        if self._next != (step, micro):
            if micro:
                raise ValueError(f"a step's micro-batches come in order; asked for {micro} of step {step} first")
            order = BatchOrder(self.groups, cfg.train_batch_size, cfg.seed, processes, cfg.gradient_accumulation_steps)
            workers = cfg.dataloader_workers
            from .stop_signal import ignore_stop_signals

            self._iter = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=StepSampler(order, step, process),
                                                          num_workers=workers, collate_fn=collate,
                                                          worker_init_fn=ignore_stop_signals if workers else None))
        images, captions, time_ids = next(self._iter)
        if images is None:
            raise BadInputError(captions)
        last = micro + 1 == cfg.gradient_accumulation_steps
        self._next = (step + 1, 0) if last else (step, micro + 1)
        return images, captions, time_ids
