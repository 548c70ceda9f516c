"""The align stage's data: (image, long caption) pairs (read from the layouts users have and checked up front by
:mod:`trainer.align_sources`: ``datasets`` folders, path columns in ``.csv``/``.jsonl``, image folders with ``.txt``
captions and kohya's repeat folders) in batches.

Images are decoded by a DataLoader's workers. Each epoch walks the rows without replacement in a seeded order; the position is
a function of the step, so a resumed run continues at exactly the next image. With ``--buckets`` every image goes
to the aspect-ratio bucket of about the training resolution's area nearest its own shape (the usual SDXL 1024²
buckets at 1024), is resized to cover it and centre-cropped, and a micro-batch holds one bucket; SDXL's size/crop
ids are those of the crop really taken.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from longalign_core.errors import BadInputError

from .align_sources import PairSource, check_images, read_pairs
from .sampling import sdxl_time_ids

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
