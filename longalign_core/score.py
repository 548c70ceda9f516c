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
import sys
from pathlib import Path

import numpy as np
import torch

from .dtypes import DTYPES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def collect_images(items: list[str]) -> list[Path]:
    """Image files of ``--images``: files as given, folders' images (by extension) in sorted order."""
    from .errors import BadInputError, check_input_file

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            try:
                found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
            except PermissionError:
                raise BadInputError(f"--images {p}: the folder cannot be listed (permissions)") from None
            if not found:
                raise BadInputError(f"--images {p}: the folder holds no images "
                                    f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += [check_input_file(f, "image", "--images") for f in found]  # dangling links, loops, empty
        else:
            paths.append(check_input_file(p, "image", "--images"))
    if not paths:
        raise BadInputError("--images: no images given")
    return paths


def pair_prompts(images: list[Path], prompt: str | None, prompts_file: str | None) -> list[str]:
    """One prompt per image: ``--prompt`` for all, or ``--prompts`` (.jsonl by image name, .txt by order)."""
    from .errors import BadConfigError, BadInputError, check_input_file, kind_of, read_text_file
    from .io_utils import json_preview, read_jsonl_records

    if (prompt is None) == (prompts_file is None):
        raise BadConfigError("give exactly one of --prompt or --prompts")
    if prompt is not None:
        return [prompt] * len(images)
    path = check_input_file(prompts_file, "prompts file", "--prompts")
    if path.suffix.lower() == ".jsonl":
        table: dict[str, tuple[int, str]] = {}
        for n, rec in read_jsonl_records(path, "prompts file", "--prompts"):
            if "image" not in rec or "prompt" not in rec:
                raise BadInputError(f"{path}:{n}: expected {{\"image\": ..., \"prompt\": ...}}, found keys "
                                    f"{sorted(rec)[:5]}")
            for key in ("image", "prompt"):
                if not isinstance(rec[key], str):
                    raise BadInputError(f"{path}:{n}: '{key}' is {kind_of(rec[key])} "
                                        f"({json_preview(rec[key])}), not a string; quote it")
            if rec["image"] in table:
                raise BadInputError(f"{path}:{n}: image {rec['image']!r} already has a prompt on line "
                                    f"{table[rec['image']][0]}; give one line per image")
            table[rec["image"]] = (n, rec["prompt"])
        out = []
        for img in images:
            key = next((k for k in (str(img), img.name, img.stem) if k in table), None)
            if key is None:
                raise BadInputError(f"{path} has no prompt for {img.name} (add a line "
                                    f"{{\"image\": \"{img.name}\", \"prompt\": ...}})")
            out.append(table[key][1])
        return out
    if path.suffix.lower() not in (".txt", ""):
        raise BadInputError(f"--prompts {path}: give a .jsonl ({{image, prompt}} per line) or a .txt (a line "
                            f"per image), not {path.suffix}")
    lines = [line for line in read_text_file(path, "prompts file", "--prompts").splitlines() if line.strip()]
    if len(lines) != len(images):
        raise BadInputError(f"{path} has {len(lines)} prompts for {len(images)} images (one line per image, in "
                            f"sorted image order)")
    return lines


def load_image(path: Path) -> torch.Tensor:
    """``(3, H, W)`` float in [0, 1] from an image file, by its real bit depth (16-bit PNGs are divided by
    65535, not clipped at 255); alpha is dropped, palettes and greyscale are expanded to RGB. An unreadable,
    truncated or non-image file is :class:`BadInputError` naming it."""
    from PIL import Image, UnidentifiedImageError

    from .errors import BadInputError

    try:
        with Image.open(path) as img:
            img.load()
            return _image_to_tensor(img, path)
    except UnidentifiedImageError:
        raise BadInputError(f"{path} is not an image PIL can read (wrong extension, or not an image at all); "
                            f"remove it from --images") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) or (
                isinstance(exc, OSError) and getattr(exc, "filename", None)):
            raise
        raise BadInputError(f"{path} could not be read ({exc}): truncated or corrupt? Save it again or remove it "
                            f"from --images") from None


def _image_to_tensor(img, path: Path) -> torch.Tensor:
    from .errors import BadInputError

    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG) is mode I;16 or I; convert("RGB") would clip every value above 255 to white.
        grey = np.asarray(img).astype(np.float64)
        peak = 65535.0
        if mode == "I" and grey.max(initial=0) > peak:
            raise BadInputError(f"{path}: 32-bit integer pixels (up to {int(grey.max())}) have no known scale; "
                                f"save it as an 8- or 16-bit image")
        x = torch.from_numpy(grey / peak).float()[None].expand(3, -1, -1)
        return x.contiguous()
    if mode == "F":
        raise BadInputError(f"{path}: floating-point pixels (mode F) have no known range; save it as an 8- or "
                            f"16-bit image")
    rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from .denscore import DEFAULT_REWEIGHT, segment_score
    from .preference import MODEL_KINDS, load_preference_model
    from .reference_direction import cached_direction
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
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--csv", default="denscore.csv", help="output CSV (default denscore.csv)")
    ap.add_argument("--plot", default="denscore.png", help="output PNG chart (default denscore.png)")
    args = ap.parse_args(argv)

    # Options, paths and inputs are checked before the model loads: a mistake costs nothing and writes nothing.
    from .encode import check_device
    from .errors import BadConfigError, check_output_path, check_positive, read_text_file

    check_positive(args.batch_size, "--batch-size")
    if not 0.0 <= args.omega <= 1.0:
        raise BadConfigError(f"--omega (reweight factor) must be in [0, 1], got {args.omega}")
    check_device(args.device)
    csv_path, plot_path = check_output_path(args.csv, "--csv"), check_output_path(args.plot, "--plot")
    if csv_path.resolve() == plot_path.resolve():
        raise BadConfigError(f"--csv and --plot are the same file {args.csv}; give two names")
    images = collect_images(args.images)
    prompts = pair_prompts(images, args.prompt, args.prompts)
    for path in images:  # decode each once now: a truncated or foreign file fails before the model loads
        load_image(path)
    reference = None
    if args.reference_prompts:
        text = read_text_file(args.reference_prompts, "reference prompts file", "--reference-prompts")
        reference = [line for line in text.splitlines() if line.strip()]
        if not reference:
            raise BadConfigError(f"--reference-prompts {args.reference_prompts} holds no prompts (one per line)")
    dtype = DTYPES[args.dtype]
    model = load_preference_model(args.model, args.kind, args.processor, args.arch, args.device, dtype)
    from .reference_direction import default_reference_prompts

    ref_list = reference if reference is not None else default_reference_prompts()
    with tqdm(total=1, desc="common direction V", disable=None) as bar:  # segment_score's defaults below
        v = cached_direction(model, ref_list, "sentence", "truncate", model_path=args.model,
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
    chart = render_segment_chart(merged, [Path(p).name for p in labels], max_images=min(len(labels), 12))
    from PIL import Image

    from .io_utils import atomic_path

    # Both outputs are rendered before either is written.
    write_csv(rows, csv_path)
    with atomic_path(plot_path) as tmp:
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
    from .errors import run_cli

    sys.exit(run_cli(main, prog="python -m longalign_core.score"))
