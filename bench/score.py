"""Benchmark: Denscore segment-level scoring, as ratios measured side by side in one run.

    python bench/score.py              # CLIP-B/16 shapes
    python bench/score.py --clip-h     # also CLIP-H/14 shapes (Denscore's size; slow on a CPU)

Workload: 8 images (512x512) x one 10-segment prompt, random weights (timing does not depend on values).
Compared with:
  floor  = preprocessing + the image-encoder forward alone for the same batch (text is cheap next to images);
  loop   = a per-image, per-segment loop (one image forward per image, one text forward per segment and image);
  ours   = segment_score, text features cold (first time the prompt is seen) and cached (best-of-N, repeats).
Then how ours grows with segments and images. Target: cached <= 1.10x the floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longalign_core.clip_vocab import load_clip_tokenizer  # noqa: E402
from longalign_core.denscore import _cache_of, preprocess_images, segment_score  # noqa: E402
from longalign_core.preference import wrap_hf_clip  # noqa: E402

SHAPES = {
    "CLIP-B/16": dict(text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                      vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, patch_size=16), projection=512),
    "CLIP-H/14": dict(text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                      vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=16, patch_size=14), projection=1024),
}

SENTENCES = [
    "A weathered stone lighthouse stands on a dark cliff above a grey sea at dusk.",
    "Huge waves crash against the rocks below, throwing white spray into the cold air.",
    "A keeper in a yellow raincoat climbs the iron stairs, carrying a brass lantern.",
    "White gulls circle the glass lamp room at the top of the tower.",
    "The sky fades from burning orange to deep violet, with the first stars.",
    "In the foreground, a red and blue rowing boat is tied to a rusted iron ring.",
    "Old fishing nets hang drying on a crooked fence beside lobster traps.",
    "A fat black cat with green eyes sleeps curled up on an upturned crate.",
    "An old fisherman with a white beard mends a torn net by lantern light.",
    "Thin grey smoke rises from the chimney of a whitewashed cottage.",
]


def build(shape: str):
    from transformers import CLIPConfig, CLIPModel

    s = SHAPES[shape]
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407, hidden_act="gelu", **s["text"]),
                     vision_config=dict(image_size=224, hidden_act="gelu", **s["vision"]),
                     projection_dim=s["projection"])
    torch.manual_seed(0)
    return wrap_hf_clip(CLIPModel(cfg), load_clip_tokenizer(), shape)


def timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench(shape: str, repeats: int) -> None:
    model = build(shape)
    images = torch.rand(8, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    prompt = " ".join(SENTENCES)
    v = F.normalize(torch.randn(SHAPES[shape]["projection"]), dim=0)

    @torch.no_grad()
    def floor():
        model.image_features(preprocess_images(images, 224, model.mean, model.std))

    @torch.no_grad()
    def loop():
        for b in range(images.shape[0]):
            x = F.normalize(model.image_features(preprocess_images(images[b:b + 1], 224, model.mean, model.std)), dim=-1)
            t = torch.stack([F.normalize(model.text_features([s]), dim=-1)[0] for s in SENTENCES])
            (t.mean(0) @ x[0]).item()

    @torch.no_grad()
    def cold():
        _cache_of(model).clear()
        segment_score(model, images, prompt, direction=v)

    @torch.no_grad()
    def cached():
        segment_score(model, images, prompt, direction=v)

    rounds = {name: [] for name in ("floor", "loop", "cold", "cached")}
    fns = {"floor": floor, "loop": loop, "cold": cold, "cached": cached}
    for fn in fns.values():
        fn()
    for _ in range(repeats):  # interleaved
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            rounds[name].append(time.perf_counter() - t0)
    t = {k: statistics.median(v_) for k, v_ in rounds.items()}
    print(f"[{shape}, 8 images 512x512, 10-segment prompt, {torch.get_num_threads()} threads]")
    print(f"  floor (image forward alone)     : {t['floor'] * 1e3:9.1f} ms")
    print(f"  per-image, per-segment loop     : {t['loop'] * 1e3:9.1f} ms   {t['loop'] / t['floor']:.2f}x floor")
    print(f"  segment_score, text cold        : {t['cold'] * 1e3:9.1f} ms   {t['cold'] / t['floor']:.2f}x floor")
    print(f"  segment_score, text cached      : {t['cached'] * 1e3:9.1f} ms   {t['cached'] / t['floor']:.2f}x floor "
          f"(target <= 1.10x)")
    print("  growth (cold text):")
    for n_seg in (5, 10, 20):
        p = " ".join((SENTENCES * 2)[:n_seg])
        t_ = timed(lambda: (_cache_of(model).clear(), segment_score(model, images, p, direction=v)), max(1, repeats // 2))
        print(f"    {n_seg:>2} segments x 8 images : {t_ * 1e3:9.1f} ms")
    for n_img in (4, 8, 16):
        imgs = torch.rand(n_img, 3, 512, 512)
        t_ = timed(lambda: segment_score(model, imgs, prompt, direction=v), max(1, repeats // 2))
        print(f"    10 segments x {n_img:>2} images: {t_ * 1e3:9.1f} ms (text cached)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clip-h", action="store_true", help="also run CLIP-H/14 shapes (about a minute per run on 2 cores)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}")
    bench("CLIP-B/16", args.repeats)
    if args.clip_h:
        bench("CLIP-H/14", max(1, args.repeats // 3))


if __name__ == "__main__":
    main()
