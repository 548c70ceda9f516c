"""The align stage on the data users have (issue #22): three layouts, images checked before the models load,
a DataLoader with workers, epochs without replacement that resume at the exact position, and SDXL aspect-ratio
buckets with the size/crop ids of the crop really taken. Expected pixels and ids are computed here with
PIL/torchvision directly."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from longalign_core.errors import BadInputError
from trainer.align_data import AlignData, BatchOrder, bucket_resolutions
from trainer.config import TrainConfig
from trainer_support import FAST, one_thread  # noqa: F401  (autouse fixture)

CAPTIONS = ["A red fox sits on a mossy rock. The sky is orange.", "A lighthouse on a cliff. Waves crash below.",
            "An old man reads a newspaper. His dog sleeps.", "A bowl of lemons on a table. Light from the window.",
            "A tram climbs a steep street. Washing hangs above."]
#: (height, width) of the images: squares, a portrait, two landscapes.
SIZES = [(48, 48), (80, 72), (40, 96), (96, 40), (64, 64)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def cfg_for(prompts, *extra) -> TrainConfig:
    return TrainConfig.from_args(["--stage", "align", "--prompts", str(prompts), *FAST, *extra])


def expected_square(path, side: int) -> tuple[torch.Tensor, list[float]]:
    """torchvision directly: short side to ``side``, centre crop; SDXL ids (h, w, top, left, side, side)."""
    pixels = TF.to_dtype(TF.to_image(Image.open(path).convert("RGB")), torch.float32, scale=True)
    h, w = pixels.shape[-2:]
    resized = TF.resize(pixels, side, antialias=True)
    top, left = (round((n - side) / 2) for n in resized.shape[-2:])
    return TF.crop(resized, top, left, side, side), [h, w, top, left, side, side]


def layouts(root, images) -> dict:
    """The same five pairs in each layout a user may have."""
    import datasets

    out = {}
    ds = datasets.Dataset.from_dict({"image": [Image.open(p) for p in images], "caption": CAPTIONS},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    ds.save_to_disk(str(root / "with_images"))
    out["datasets, image column"] = (root / "with_images", [])
    # the released LongAlign layout: a `path` column, the images downloaded beside the dataset folder
    (root / "release").mkdir()
    for p in images:
        (root / "release" / p.name).write_bytes(p.read_bytes())
    datasets.Dataset.from_dict({"path": [p.name for p in images], "caption": CAPTIONS}).save_to_disk(
        str(root / "release" / "longalign"))
    out["datasets, path column"] = (root / "release" / "longalign", ["--image-column", "path"])
    with (root / "release" / "pairs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows(zip([p.name for p in images], CAPTIONS))
    out["csv"] = (root / "release" / "pairs.csv", ["--image-column", "path"])
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "pairs.jsonl").write_text(
        "".join(json.dumps({"file": p.name, "caption": c}) + "\n" for p, c in zip(images, CAPTIONS)))
    out["jsonl, --image-root"] = (root / "elsewhere" / "pairs.jsonl",
                                  ["--image-column", "file", "--image-root", str(images[0].parent)])
    (root / "kohya").mkdir()
    for p, c in zip(images, CAPTIONS):
        (root / "kohya" / p.name).write_bytes(p.read_bytes())
        (root / "kohya" / p.name).with_suffix(".txt").write_text(c + "\n")
    out["image folder, .txt captions"] = (root / "kohya", [])
    return out


def test_every_layout_gives_the_same_pairs(tmp_path, images):
    for name, (prompts, extra) in layouts(tmp_path, images).items():
        data = AlignData(cfg_for(prompts, *extra))
        assert data.captions == CAPTIONS, name
        data.check(list(range(5)))
        data.bucket(32, buckets=False)
        for i in range(5):
            pixels, caption, time_ids = data.dataset[i]
            want, ids = expected_square(images[i], 32)
            torch.testing.assert_close(pixels, want, msg=f"{name}, row {i}")
            assert caption == CAPTIONS[i] and time_ids.tolist() == ids, (name, i)


def test_a_missing_or_broken_image_is_named_before_any_model_loads(tmp_path, images, monkeypatch):
    import trainer.finetune as finetune
    import trainer.parts as parts

    monkeypatch.setattr(parts, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    table = tmp_path / "pairs.csv"
    table.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in zip(images[:2], CAPTIONS)) +
                     "gone.png,A missing image.\n")
    with pytest.raises(BadInputError, match=rf"{table}:4: image {tmp_path / 'gone.png'} not found"):
        finetune.Trainer(cfg_for(table, "--image-column", "path", "--validation-prompts", "0",
                                 "--output-dir", str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(images[1].read_bytes()[:-200])
    table.write_text(f"path,caption\n{images[0]},{CAPTIONS[0]}\n{truncated},{CAPTIONS[1]}\n")
    with pytest.raises(BadInputError, match=rf"{table}:3: the image cannot be read .* truncated or not an image"):
        finetune.Trainer(cfg_for(table, "--image-column", "path", "--validation-prompts", "0",
                                 "--output-dir", str(tmp_path / "run")))
    kohya = tmp_path / "kohya"
    kohya.mkdir()
    (kohya / "a.png").write_bytes(images[0].read_bytes())
    with pytest.raises(BadInputError, match=r"a.png has no caption file a.txt beside it"):
        AlignData(cfg_for(kohya))


def test_epochs_walk_every_row_once_in_full_batches():
    order = BatchOrder([list(range(10))], batch=3, seed=1, processes=1, accumulation=1)
    first = [order.batch_of(step, 0, 0) for step in range(4)]
    assert all(len(b) == 3 for b in first)
    flat = [i for b in first for i in b]
    assert sorted(set(flat)) == list(range(10)) and len(flat) == 12  # 2 repeats fill the last batch
    second = [order.batch_of(step, 0, 0) for step in range(4, 8)]
    assert sorted(set(i for b in second for i in b)) == list(range(10)) and second != first
    two = BatchOrder([list(range(10))], batch=3, seed=1, processes=2, accumulation=1)
    assert [two.batch_of(0, 0, 0), two.batch_of(0, 0, 1), two.batch_of(1, 0, 0), two.batch_of(1, 0, 1)] == first


def test_the_loader_resumes_at_the_exact_position_with_workers(tmp_path, images):
    prompts, extra = layouts(tmp_path, images)["image folder, .txt captions"]

    def data():
        d = AlignData(cfg_for(prompts, *extra, "--train-batch-size", "2", "--gradient-accumulation-steps", "2",
                              "--dataloader-workers", "2"))
        d.check(list(range(5)))
        d.bucket(32, buckets=False)
        return d

    straight = data()
    seen = [straight.batch(step, micro, 0, 1)[1] for step in range(5) for micro in range(2)]
    resumed = data()
    assert [resumed.batch(step, micro, 0, 1)[1] for step in range(3, 5) for micro in range(2)] == seen[6:]
    # one epoch (5 rows, 3 batches of 2) sees every caption
    assert set(c for batch in seen[:3] for c in batch) == set(CAPTIONS)


def test_buckets_are_the_usual_sdxl_ones_and_keep_the_area():
    found = bucket_resolutions(1024)
    usual = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
             (1536, 640), (640, 1536)]  # (height, width) of SDXL's common training buckets
    assert set(usual) <= set(found)
    assert all(h * w <= 1024 * 1024 and h % 64 == 0 and w % 64 == 0 for h, w in found)
    assert all(h * w > 0.9 * 1024 * 1024 for h, w in found if 0.5 <= h / w <= 2)


def test_buckets_crop_what_the_time_ids_say_and_batches_hold_one_bucket(tmp_path, images):
    prompts, extra = layouts(tmp_path, images)["datasets, image column"]
    d = AlignData(cfg_for(prompts, *extra, "--train-batch-size", "2", "--dataloader-workers", "0"))
    d.check(list(range(5)))
    d.bucket(64, buckets=True)
    buckets = bucket_resolutions(64)
    for i, (h, w) in enumerate(SIZES):
        pixels, _, ids = d.dataset[i]
        bh, bw = min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(h / w)))
        assert tuple(pixels.shape[-2:]) == (bh, bw)
        # independently: resize to cover the bucket (sizes truncated as torchvision does), crop the centre
        scale = max(bh / h, bw / w)
        rh, rw = max(bh, int(h * scale)), max(bw, int(w * scale))
        full = TF.resize(TF.to_dtype(TF.to_image(Image.open(images[i]).convert("RGB")), torch.float32, scale=True),
                         [rh, rw], antialias=True)
        top, left = round((rh - bh) / 2), round((rw - bw) / 2)
        torch.testing.assert_close(pixels, full[:, top:top + bh, left:left + bw])
        assert ids.tolist() == [h, w, top, left, bh, bw]
    assert (40, 96) != (96, 40) and len({tuple(d.dataset[i][0].shape) for i in range(5)}) >= 3
    for step in range(6):
        batch, _, ids = d.batch(step, 0, 0, 1)
        assert len({tuple(r[4:].tolist()) for r in ids}) == 1 and batch.shape[-2:] == tuple(ids[0, 4:].int().tolist())


def test_align_stage_trains_on_sdxl_buckets_from_a_caption_folder(tmp_path, images):
    from safetensors.torch import load_file

    from trainer.finetune import Trainer

    prompts, _ = layouts(tmp_path, images)["image folder, .txt captions"]
    t = Trainer(TrainConfig.from_args(["--model", "embedded-sdxl", "--stage", "align", "--prompts", str(prompts),
                                       "--output-dir", str(tmp_path / "run"), *FAST, "--buckets",
                                       "--train-steps", "2", "--validation-prompts", "0"]))
    lora = t.train()
    assert len(load_file(str(lora))) == 3 * len(t.parts.lora.targets)


def kohya_folder(root, images, layout: dict[str, list[int]]):
    """A kohya ``train_data_dir``: each sub-folder's images (indices into ``images``) with their captions."""
    for sub, picks in layout.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in picks:
            (root / sub / images[i].name).write_bytes(images[i].read_bytes())
            (root / sub / images[i].with_suffix(".txt").name).write_text(CAPTIONS[i])
    return root


def test_kohya_repeat_folders_are_honoured(tmp_path, images):
    """``10_cat/`` with three images and ``3_dog/`` with one: 33 images per epoch (kohya's count), each cat
    image 10 times and the dog 3 times; a plain sub-folder counts once."""
    folder = kohya_folder(tmp_path / "train", images, {"10_cat": [0, 1, 2], "3_dog": [3], "misc": [4]})
    data = AlignData(cfg_for(folder, "--validation-prompts", "0"))
    data.check(list(range(5)))
    data.bucket(32, False)
    order = BatchOrder(data.groups, batch=1, seed=0, processes=1, accumulation=1)
    assert order.per_epoch == 34
    epoch = [order.batch_of(step, 0, 0)[0] for step in range(34)]
    by_name = {data.source.paths[i].parent.name + "/" + data.source.paths[i].name: epoch.count(i) for i in set(epoch)}
    assert by_name == {"10_cat/img0.png": 10, "10_cat/img1.png": 10, "10_cat/img2.png": 10, "3_dog/img3.png": 3,
                       "misc/img4.png": 1}
    assert "5 training images come 34 times per epoch" in data.describe()


def test_kohya_zero_repeats_is_refused(tmp_path, images):
    folder = kohya_folder(tmp_path / "train", images, {"0_cat": [0], "2_dog": [1]})
    with pytest.raises(BadInputError, match=r"0_cat: a kohya repeat folder with 0 repeats .* rename it to 1_cat"):
        AlignData(cfg_for(folder))


def test_a_missing_held_out_image_is_named_up_front(tmp_path, images, monkeypatch):
    """The held-out validation rows' images are checked too, before any model loads."""
    import trainer.finetune as finetune
    import trainer.parts as parts
    from trainer.data import split_validation

    monkeypatch.setattr(parts, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))
    held = [CAPTIONS.index(c) for c in split_validation(CAPTIONS, 1, 0, "t")[0]]
    assert len(held) == 1
    paths = [str(p) for p in images]
    paths[held[0]] = str(tmp_path / "gone.png")
    table = tmp_path / "pairs.csv"
    table.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in zip(paths, CAPTIONS)))
    with pytest.raises(BadInputError, match=rf"{table}:{held[0] + 2}: image {tmp_path / 'gone.png'} not found"):
        finetune.Trainer(cfg_for(table, "--image-column", "path", "--validation-prompts", "1",
                                 "--output-dir", str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
