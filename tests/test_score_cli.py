"""`python -m longalign_core.score`: folder of images + prompts -> CSV + PNG."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from longalign_core.denscore import segment_score
from longalign_core.preference import load_preference_model
from longalign_core.reference_direction import default_reference_prompts, direction_from_prompts
from longalign_core.score import load_image, main

PROMPTS = {"a.png": "A red fox on a rock. The sky is orange.", "b.png": "A blue boat. Calm sea! Gulls fly.",
           "c.png": "A red fox on a rock. The sky is orange."}


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, size in zip(PROMPTS, [(48, 48), (40, 56), (48, 48)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_cli_writes_csv_and_plot_matching_the_core(tmp_path, image_dir, tiny_clip_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"image": k, "prompt": v}) for k, v in PROMPTS.items()))
    out_csv, out_png = tmp_path / "s.csv", tmp_path / "s.png"
    assert main(["--model", str(tiny_clip_dir), "--images", str(image_dir), "--prompts", str(prompts),
                 "--csv", str(out_csv), "--plot", str(out_png), "--batch-size", "2"]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    overall = [r for r in rows if r["segment"] == "all"]
    assert [r["image"].rsplit("/", 1)[-1] for r in overall] == list(PROMPTS)
    assert len(rows) == 3 + 2 + 3 + 2
    model = load_preference_model(tiny_clip_dir)
    v = direction_from_prompts(model, default_reference_prompts())
    for r, name in zip(overall, PROMPTS):
        img = load_image(image_dir / name)[None]
        expected = segment_score(model, img, PROMPTS[name], direction=v).parts
        assert float(r["score"]) == pytest.approx(float(expected.score[0]), abs=1e-5)
        # each column holds its own part (a swapped or duplicated column fails: the parts differ by far)
        assert float(r["text_relevant"]) == pytest.approx(float(expected.relevant[0]), abs=1e-5)
        assert float(r["text_irrelevant"]) == pytest.approx(float(expected.irrelevant[0]), abs=1e-5)
        assert float(r["eta"]) == pytest.approx(float(expected.eta[0]), abs=1e-5)
    with Image.open(out_png) as im:
        assert im.size[0] > 400
    assert "wrote" in capsys.readouterr().out
    assert list(tiny_clip_dir.glob("longalign_direction-*.safetensors"))  # V cached next to the model


def test_cli_errors_are_clear(tmp_path, image_dir, tiny_clip_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"image": "a.png", "prompt": "x"}))
    with pytest.raises(ValueError, match="no prompt for b.png"):
        main(["--model", str(tiny_clip_dir), "--images", str(image_dir), "--prompts", str(prompts)])
    with pytest.raises(ValueError, match="exactly one of --prompt or --prompts"):
        main(["--model", str(tiny_clip_dir), "--images", str(image_dir)])
    with pytest.raises(ValueError, match="image .*missing.* not found"):
        main(["--model", str(tiny_clip_dir), "--images", str(tmp_path / "missing"), "--prompt", "x"])
