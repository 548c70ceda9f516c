"""(image, long caption) pairs for the align stage: read from a local ``datasets`` folder, drawn per micro-batch
with the step's generator, resized and centre-cropped to the training resolution, with SDXL's size/crop ids of
the crop really taken."""

from __future__ import annotations

from pathlib import Path

import torch

from longalign_core.errors import BadConfigError, BadInputError

from .data import check_captions
from .sampling import sdxl_time_ids


class AlignDataset:
    """The pairs of a ``datasets`` folder (``save_to_disk``) with an image and a caption column. ``captions`` holds
    every row's caption (the held-out split is drawn from them)."""

    def __init__(self, folder: str | None, image_column: str, caption_column: str):
        import datasets

        if not folder or not Path(folder).is_dir():
            raise BadConfigError("the align stage needs --prompts pointing at a local `datasets` folder "
                                 "(save_to_disk) with image and caption columns")
        ds = datasets.load_from_disk(folder)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        for col, opt in ((image_column, "--image-column"), (caption_column, "--caption-column")):
            if col not in ds.column_names:
                raise BadInputError(f"{folder} has no column {col!r} (columns: {ds.column_names}); set {opt}")
        captions = ds[caption_column]
        check_captions(captions, folder, caption_column)
        self.ds, self.image_column = ds, image_column
        self.captions = [c.replace("\n\n", " ").strip() for c in captions]

    def batch(self, rows: list[int], batch_size: int, resolution: int, gen: torch.Generator):
        """``batch_size`` pairs drawn from ``rows`` with ``gen``: images ``(B, 3, res, res)`` in [0, 1], their
        captions and SDXL time ids ``(B, 6)``."""
        from torchvision.transforms.v2 import functional as TF

        idx = [rows[int(i)] for i in torch.randint(0, len(rows), (batch_size,), generator=gen)]
        images, time_ids = [], []
        for img in self.ds.select(idx)[self.image_column]:
            t = TF.to_dtype(TF.to_image(img.convert("RGB")), torch.float32, scale=True)
            original = tuple(t.shape[-2:])
            t = TF.resize(t, resolution, antialias=True)
            top, left = (round((n - resolution) / 2) for n in t.shape[-2:])  # the centre crop
            images.append(TF.crop(t, top, left, resolution, resolution))
            # SDXL's micro-conditioning: the image's real size and where the crop took it from
            time_ids.append(sdxl_time_ids(original, (top, left), (resolution, resolution)))
        return torch.stack(images), [self.captions[i] for i in idx], torch.stack(time_ids)
