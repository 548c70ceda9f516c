"""Benchmark: segment-level encoding cost, as ratios measured side by side in one run.

    python bench/encode.py                        # transformers path
    COMFYUI_PATH=/path/to/ComfyUI python bench/encode.py   # + through ComfyUI's CLIP object

Workload: the built-in 14-sentence, ~220-token prompt (``longalign_core.examples.EXAMPLE_PROMPT``) on a
full-size CLIP-L text encoder with random weights (timing does not depend on the values).

1. transformers: all segments in one forward padded to the longest segment, vs the same prompt as 77-token
   chunks (what a chunked long-prompt encoder does). Target <= 1.2x.
2. ComfyUI (with COMFYUI_PATH): LongAlign Text Encode vs ComfyUI's own CLIPTextEncode on the same CLIP object.
   cold = empty segment cache (target <= 3x); edit = one sentence changed, cache warm (target <= 0.35x the
   native full re-encode).
Runs are interleaved and the median of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from longalign_core import CLIPSegmentEncoder  # noqa: E402
from longalign_core.clip_vocab import load_clip_tokenizer  # noqa: E402
from longalign_core.examples import EXAMPLE_PROMPT  # noqa: E402


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_transformers(repeats: int, attention: str) -> dict[str, float]:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                         attn_implementation=attention)
    model = CLIPTextModel(cfg).eval()
    tok = load_clip_tokenizer()
    enc = CLIPSegmentEncoder(tok, model)
    enc.padding_embedding()  # computed once per encoder, as in use

    ids = tok(EXAMPLE_PROMPT, add_special_tokens=False, verbose=False).input_ids
    chunks = [ids[i:i + 75] for i in range(0, len(ids), 75)]
    chunk_ids = torch.tensor([[49406] + c + [49407] * (76 - len(c)) for c in chunks])

    def chunked():
        with torch.no_grad():
            model(chunk_ids)

    def segments():
        enc.encode(EXAMPLE_PROMPT)

    segments(), chunked()  # warm-up
    t = median_times({"segments": segments, "chunked77": chunked}, repeats)
    n_seg = len(enc.encode(EXAMPLE_PROMPT).reports[0].segments)
    print(f"[transformers, CLIP-L shape, attention={attention}, {n_seg} segments, {len(ids)} tokens, "
          f"{len(chunks)} chunks of 77]")
    print(f"  segments padded to longest : {t['segments'] * 1e3:8.1f} ms")
    print(f"  77-token chunk encoding    : {t['chunked77'] * 1e3:8.1f} ms")
    ratio = t["segments"] / t["chunked77"]
    print(f"  ratio segments / chunked   : {ratio:8.2f}x   (target <= 1.2x)")
    return {"transformers_ratio": ratio}


def bench_comfy(repeats: int) -> dict[str, float]:
    from comfy_support import host_clip, load_pack

    pack = load_pack()
    mods = sys.modules
    clip_segments = mods[pack.__name__ + ".nodes.clip_segments"]
    clip = host_clip("l")
    sentences = EXAMPLE_PROMPT.split(". ")
    edits = [". ".join(sentences[:7] + [sentences[7].replace("cat", f"cat number {i}")] + sentences[8:])
             for i in range(repeats + 2)]

    def native():
        clip.encode_from_tokens_scheduled(clip.tokenize(EXAMPLE_PROMPT))

    def cold():
        clip_segments.HostClipSegments(clip, clip_segments.SegmentCache()).encode(EXAMPLE_PROMPT)

    def cold_host_path():
        clip_segments.HostClipSegments(clip, clip_segments.SegmentCache(), fast=False).encode(EXAMPLE_PROMPT)

    warm_cache = clip_segments.SegmentCache()
    clip_segments.HostClipSegments(clip, warm_cache).encode(EXAMPLE_PROMPT)
    edit_iter = iter(edits)

    def edit():
        clip_segments.HostClipSegments(clip, warm_cache).encode(next(edit_iter))

    native(), cold(), cold_host_path(), edit()  # warm-up
    t = median_times({"native": native, "cold": cold, "cold_host": cold_host_path, "edit": edit}, repeats)
    print("[ComfyUI CLIP object, SD1.x CLIP-L]")
    print(f"  CLIPTextEncode (native)    : {t['native'] * 1e3:8.1f} ms")
    print(f"  LongAlign, cold cache      : {t['cold'] * 1e3:8.1f} ms   ratio {t['cold'] / t['native']:.2f}x "
          f"(target <= 3x)")
    print(f"  LongAlign, cold, trimmed forward off (one 77-chunk per sentence): {t['cold_host'] * 1e3:8.1f} ms   "
          f"ratio {t['cold_host'] / t['native']:.2f}x")
    print(f"  LongAlign, one sentence edited, warm cache: {t['edit'] * 1e3:8.1f} ms   ratio "
          f"{t['edit'] / t['native']:.2f}x (target <= 0.35x)")
    return {"comfy_cold_ratio": t["cold"] / t["native"], "comfy_edit_ratio": t["edit"] / t["native"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for attention in ("sdpa", "eager"):
        bench_transformers(args.repeats, attention)
    import os

    if os.environ.get("COMFYUI_PATH"):
        bench_comfy(args.repeats)
    else:
        print("[ComfyUI] skipped: set COMFYUI_PATH to a ComfyUI checkout")


if __name__ == "__main__":
    main()
