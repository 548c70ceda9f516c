"""Score images against long prompts with Denscore (or PickScore, CLIP-H, HPSv2) and its decomposition.

    python -m longalign_core.score --model models/denscore/Denscore --images outputs/ --prompt "A red fox. ..."
    python -m longalign_core.score --model models/denscore/Denscore --images outputs/ --prompts prompts.jsonl \\
        --csv scores.csv --plot scores.png
    python -m longalign_core.score --model HPS_v2_compressed.pt --images a.png b.png --prompt "..."

Prompts: ``--prompt TEXT`` for every image, or ``--prompts FILE``: JSONL with ``{"image": "name.png", "prompt":
"..."}`` per line (``image`` is matched against the file name or the path), or a ``.txt`` whose lines pair with
the images in sorted order. The CSV has one row per image (segment ``all``) and one per image and segment, with
the score, its text-relevant and text-irrelevant parts, η and the reweighted score; values are cosines (the
paper reports ×100). The plot shows per-sentence bars for each image. V (the common text direction) comes from
the shipped reference prompt set unless ``--reference-prompts FILE`` is given, and is cached next to the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def collect_images(items: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no image or folder at {p}")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {items}")
    return paths


def pair_prompts(images: list[Path], prompt: str | None, prompts_file: str | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise ValueError("give exactly one of --prompt or --prompts")
    if prompt is not None:
        return [prompt] * len(images)
    path = Path(prompts_file)
    if path.suffix == ".jsonl":
        table = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                if not isinstance(rec, dict) or "image" not in rec or "prompt" not in rec:
                    raise ValueError(f"{path}:{n}: expected {{\"image\": ..., \"prompt\": ...}}")
                table[rec["image"]] = rec["prompt"]
        out = []
        for img in images:
            key = next((k for k in (str(img), img.name, img.stem) if k in table), None)
            if key is None:
                raise ValueError(f"{path} has no prompt for {img.name}")
            out.append(table[key])
        return out
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != len(images):
        raise ValueError(f"{path} has {len(lines)} prompts for {len(images)} images (one line per image, in "
                         f"sorted image order)")
    return lines


def load_image(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float().div(255)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from .denscore import (DEFAULT_REWEIGHT, direction_cache_file, direction_from_prompts, prompts_digest,
                           segment_score)
    from .preference import MODEL_KINDS, load_preference_model
    from .score_chart import format_report, render_segment_chart, result_rows, write_csv

    ap = argparse.ArgumentParser(prog="python -m longalign_core.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face CLIPModel folder (Denscore, PickScore, CLIP-H), "
                                                   "open_clip checkpoint (HPSv2), or a Hub id when online")
    ap.add_argument("--kind", choices=MODEL_KINDS, default="auto")
    ap.add_argument("--processor", help="folder with the CLIP-H tokenizer/preprocessor files, if not in --model")
    ap.add_argument("--arch", default="ViT-H-14", help="open_clip architecture for checkpoints (HPSv2: ViT-H-14)")
    ap.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    ap.add_argument("--prompt", help="one prompt for every image")
    ap.add_argument("--prompts", help=".jsonl ({image, prompt} per line) or .txt (a line per image)")
    ap.add_argument("--reference-prompts", help="text file, one prompt per line, defining V (default: shipped)")
    ap.add_argument("--omega", type=float, default=DEFAULT_REWEIGHT, help="reweight factor ω (default 0.3)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per forward")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--csv", default="denscore.csv", help="output CSV (default denscore.csv)")
    ap.add_argument("--plot", default="denscore.png", help="output PNG chart (default denscore.png)")
    args = ap.parse_args(argv)

    images = collect_images(args.images)
    prompts = pair_prompts(images, args.prompt, args.prompts)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = load_preference_model(args.model, args.kind, args.processor, args.arch, args.device, dtype)
    reference = None
    if args.reference_prompts:
        reference = [line for line in Path(args.reference_prompts).read_text(encoding="utf-8").splitlines()
                     if line.strip()]
    from .denscore import default_reference_prompts

    ref_list = reference if reference is not None else default_reference_prompts()
    cache = direction_cache_file(args.model, prompts_digest(ref_list))
    with tqdm(total=1, desc="common direction V", disable=None) as bar:
        v = direction_from_prompts(model, ref_list, cache_file=cache,
                                   progress=lambda d, t: (setattr(bar, "total", t), bar.update(d - bar.n)))

    results, labels = [], [str(p) for p in images]
    for i in tqdm(range(0, len(images), args.batch_size), desc="scoring", disable=None):
        batch_paths = images[i:i + args.batch_size]
        batch = [load_image(p) for p in batch_paths]
        sizes = {tuple(b.shape) for b in batch}
        groups = [batch] if len(sizes) == 1 else [[b] for b in batch]  # mixed sizes: one at a time
        k = i
        for g in groups:
            with torch.no_grad():
                results.append((k, segment_score(model, torch.stack(g).to(args.device), prompts[k:k + len(g)],
                                                 direction=v, omega=args.omega)))
            k += len(g)
    merged = _merge(results)
    rows = result_rows(merged, labels)
    write_csv(rows, args.csv)
    chart = render_segment_chart(merged, [Path(p).name for p in labels], max_images=min(len(labels), 12))
    from PIL import Image

    from .io_utils import atomic_path

    with atomic_path(args.plot) as tmp:
        Image.fromarray(chart).save(tmp, format="PNG")
    print(format_report(merged, [Path(p).name for p in labels]))
    print(f"wrote {args.csv} ({len(rows)} rows) and {args.plot}")
    return 0


def _merge(results):
    """Concatenate per-batch :class:`ScoreResult`s in image order."""
    from .denscore import Decomposition, ScoreResult

    results = [r for _, r in sorted(results, key=lambda kr: kr[0])]
    parts = Decomposition(*(torch.cat([getattr(r.parts, f) for r in results])
                            for f in ("score", "relevant", "irrelevant", "eta", "reweighted")))
    cat = lambda name: [x for r in results for x in getattr(r, name)]  # noqa: E731
    warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
    return ScoreResult(parts, cat("segment_scores"), cat("segment_relevant"), cat("segment_irrelevant"),
                       cat("prompts"), results[0].direction, warnings)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
