"""Benchmark: peak memory of loading a real-size SDXL single-file checkpoint with the trainer's loader
(``trainer.loading.models.load_base_model``), in the training dtype, against the size of the weights.

    python bench/load.py                       # build (once) a 6.9 GB bf16 SDXL-base file, load it in bf16
    python bench/load.py --stored fp16         # the file as SDXL base is published (fp16), loaded in bf16
    python bench/load.py --dtype fp32          # for comparison: the whole model in fp32
    python bench/load.py --folder              # bench/train.py's SDXL diffusers folder (fp16 variant) in bf16,
                                               # side by side with from_pretrained's own cast

The checkpoint is SDXL base's published single-file layout (``model.diffusion_model.*``, CLIP-L under
``conditioner.embedders.0.transformer``, OpenCLIP-bigG in open_clip layout under ``conditioner.embedders.1.model``,
the VAE under ``first_stage_model``), random weights, built once under ``--cache`` from the full-size
architectures on the meta device with the key tables of ``standins/single_file.py``. Each load runs in a
fresh process, and every loaded weight is then read once (safetensors maps the file: its pages count only once
read, as the first training step reads them); the peak is that process's highest resident memory (``ru_maxrss``)
minus what it held after its imports, compared with the bytes of the weights in the training dtype. Target: <= 1.3x
for a 16-bit file (bf16, or fp16 as SDXL base is published) loaded in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from longalign_core.dtypes import DTYPES  # noqa: E402


def build(path: Path, stored: torch.dtype) -> None:
    """SDXL base in the single-file layout, random weights (~N(0, 0.02), norms at 1), written with safetensors."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from longalign_core.lora import load_unet_config
    from standins.single_file import VAE_CONFIG, clip_hf_layout, clip_open_clip_layout, unet_ldm_shapes, vae_to_ldm

    shapes = unet_ldm_shapes(load_unet_config("sdxl"))
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_CONFIG)
        text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu", **text))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            hidden_act="gelu", projection_dim=1280, **text))
        meta = dict(vae_to_ldm(k, v) for k, v in vae.state_dict().items())
        meta.update(clip_hf_layout(clip_l, "conditioner.embedders.0.transformer."))
        meta.update(clip_open_clip_layout(clip_g, "conditioner.embedders.1.model."))
    shapes.update({k: tuple(v.shape) for k, v in meta.items()})
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith((".weight", "_weight", "embedding", "text_projection")) and len(shape) > 1:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(stored)
        elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
            tensors[name] = torch.ones(shape, dtype=stored)
        else:
            tensors[name] = torch.zeros(shape, dtype=stored)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_once(path: Path, dtype: str, cast_after: bool = False) -> dict:
    """In this (fresh) process: load ``path`` with the trainer's loader; the peak above the baseline.
    ``cast_after``: each component through ``from_pretrained(torch_dtype=...)`` instead (its own cast after
    reading), the baseline of ``--folder``."""
    import trainer.loading.models
    from trainer.loading.models import load_base_model
    from trainer.memory import process_peak_bytes, rss_bytes

    if cast_after:
        trainer.loading.models.from_pretrained_in_dtype = lambda cls, source, dtype, subfolder=None, **kw: \
            cls.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype, **kw)

    import diffusers  # noqa: F401  (imports counted in the baseline, not in the load)
    import transformers  # noqa: F401

    base = rss_bytes()
    model = load_base_model(str(path), dtype=DTYPES[dtype])
    parts = [model.unet, model.vae, model.text_encoder, model.text_encoder_2]
    with torch.no_grad():  # touch every weight: memory-mapped ones count once they are read, as training reads them
        for m in parts:
            for p in m.parameters():
                p.float().sum()
    peak = process_peak_bytes()
    weights = sum(p.numel() * p.element_size() for m in parts for p in m.parameters())
    dtypes = sorted({str(p.dtype) for m in parts for p in m.parameters()})
    return {"peak_increase": peak - base, "weights_bytes": weights, "dtypes": dtypes,
            "params": sum(p.numel() for m in parts for p in m.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stored", choices=["bf16", "fp16"], default="bf16", help="the checkpoint's dtype")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the training dtype to load in")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "longalign" / "bench"))
    ap.add_argument("--folder", action="store_true", help="the SDXL diffusers folder of bench/train.py (fp16 "
                    "variant, as published) instead, side by side with from_pretrained's own cast")
    ap.add_argument("--single", help=argparse.SUPPRESS)
    ap.add_argument("--cast-after", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(load_once(Path(args.single), args.dtype, args.cast_after)))
        return
    if args.folder:
        return compare_folder(args)
    path = Path(args.cache) / f"sdxl-base-random-{args.stored}.safetensors"
    if not path.is_file():
        print(f"building {path} (once)", flush=True)
        build(path, DTYPES[args.stored])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--single", str(path), "--dtype", args.dtype], capture_output=True,
                         text=True, env=env, cwd=REPO)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"[trainer.loading.models.load_base_model, SDXL base single file ({path.stat().st_size / gib:.2f} GiB, "
          f"{args.stored}), loaded in {args.dtype}]")
    print(f"  {r['params'] / 1e9:.2f} B parameters, {r['weights_bytes'] / gib:.2f} GiB as loaded ({', '.join(r['dtypes'])})")
    print(f"  peak resident memory while loading, above the imports: {r['peak_increase'] / gib:.2f} GiB = "
          f"{r['peak_increase'] / r['weights_bytes']:.2f}x the weights (target <= 1.3x for a 16-bit file loaded in "
          f"bf16)")


def compare_folder(args) -> None:
    """The trainer's loader on bench/train.py's SDXL folder (built once) against the same components through
    ``from_pretrained(torch_dtype=...)``, each in a fresh process."""
    sys.path.insert(0, str(REPO / "bench"))
    from train import sdxl_folder

    folder = sdxl_folder(Path(args.cache))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for how in ("shipped", "cast_after"):
        cmd = [sys.executable, __file__, "--single", str(folder), "--dtype", args.dtype] + \
            (["--cast-after"] if how == "cast_after" else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        rows[how] = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    r = rows["shipped"]
    print(f"[trainer.loading.models.load_base_model, SDXL diffusers folder {folder} (fp16 variant), loaded in {args.dtype}]")
    print(f"  {r['params'] / 1e9:.2f} B parameters, {r['weights_bytes'] / gib:.2f} GiB as loaded")
    for how, label in (("shipped", "cast as read (shipped)"), ("cast_after", "from_pretrained's own cast")):
        q = rows[how]
        print(f"  {label:28s} peak above the imports {q['peak_increase'] / gib:.2f} GiB = "
              f"{q['peak_increase'] / q['weights_bytes']:.2f}x the weights")
    print(f"  shipped / from_pretrained: {r['peak_increase'] / rows['cast_after']['peak_increase']:.2f}x")


if __name__ == "__main__":
    main()
