"""Benchmark: segment-level encoding cost, as ratios measured side by side in one run.

    python bench/encode.py                        # transformers path
    COMFYUI_PATH=/path/to/ComfyUI python bench/encode.py   # + through ComfyUI's CLIP object (its interpreter)
    COMFYUI_PATH=... python bench/encode.py --models sd15  # only the SD1.5 CLIP-L rows (sdxl: only SDXL)

Workload: the built-in 14-sentence, 222-token prompt (``longalign_core.examples.EXAMPLE_PROMPT``) on full-size
text encoders with random weights (timing does not depend on the values): CLIP-L (SD1.5), CLIP-L + OpenCLIP
bigG (SDXL).

1. transformers: all segments in one forward padded to the longest segment, vs the same prompt as 77-token
   chunks (what a chunked long-prompt encoder does). Target <= 1.2x.
2. ComfyUI (with COMFYUI_PATH): the LongAlign Text Encode node (``execute``, as ComfyUI runs it) vs ComfyUI's
   own CLIPTextEncode node on the same CLIP object:
   - cold: a prompt none of whose sentences is cached, on a model state already seen (its trimmed-forward check
     and empty-prompt encode done: they happen once per model, LoRA, clip skip, device and dtype). Target SD1.5
     <= 1.3x, SDXL <= 1.4x.
   - first prompt of a model state: cold, plus that once-per-state work (reported, no target).
   - edit: one of the 14 sentences changed, cache warm. Target SD1.5 <= 0.15x, SDXL <= 0.2x.
   - positive + negative: a new positive and a new negative prompt queued together (two node runs each side).
   Then the profile split: where the time of a cold and an edit call goes.
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

from longalign_core import CLIPSegmentEncoder  # noqa: E402
from longalign_core.clip_vocab import load_clip_tokenizer  # noqa: E402
from longalign_core.examples import EXAMPLE_PROMPT  # noqa: E402


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function, the functions called in turn ``repeats`` times (interleaved, so load
    from other processes hits all of them alike)."""
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


NEGATIVE_PROMPT = "blurry, low quality, jpeg artifacts, watermark, text, deformed hands, extra fingers, cropped"

#: --models key: (label, host_clip kinds, target ratios (cold, edit))
COMFY_MODELS = {"sd15": ("SD1.5 CLIP-L", "l", (1.3, 0.15)), "sdxl": ("SDXL CLIP-L + bigG", "gl", (1.4, 0.2))}


def bench_comfy(repeats: int, model: str) -> dict[str, float]:
    from standins.comfy_host import comfy_version, host_clip, load_pack

    label, kinds, (cold_target, edit_target) = COMFY_MODELS[model]
    pack = load_pack()
    mods = sys.modules
    clip_segments = mods[pack.__name__ + ".nodes.clip_segments"]
    text_encode = mods[pack.__name__ + ".nodes.text_encode"]
    import nodes as comfy_nodes  # ComfyUI's own node classes

    native_node = comfy_nodes.CLIPTextEncode()
    node, cache = text_encode.LongAlignTextEncode, text_encode.SEGMENT_CACHE
    clip = host_clip(kinds)
    sentences = EXAMPLE_PROMPT.split(". ")
    edits = iter([". ".join(sentences[:7] + [sentences[7].replace("cat", f"cat number {i}")] + sentences[8:])
                  for i in range(4 * repeats + 8)])

    def longalign(text):
        return node.execute(clip=clip, text=text, token_budget=240, overflow="extend", split_mode="sentence",
                            long_sentences="split")

    def native():
        native_node.encode(clip, EXAMPLE_PROMPT)

    def cold():
        cache.clear(segments_only=True)
        longalign(EXAMPLE_PROMPT)

    def first():
        cache.clear()
        longalign(EXAMPLE_PROMPT)

    def edit():
        longalign(next(edits))

    def native_pair():
        native_node.encode(clip, EXAMPLE_PROMPT)
        native_node.encode(clip, NEGATIVE_PROMPT)

    def pair():
        cache.clear(segments_only=True)
        longalign(EXAMPLE_PROMPT)
        longalign(NEGATIVE_PROMPT)

    def warm_for_edit():
        cache.clear(segments_only=True)
        longalign(EXAMPLE_PROMPT)

    first(), native(), cold(), native_pair(), pair()  # warm-up (and: the model state is now checked)
    fns = {"native": native, "cold": cold, "first": first, "native_pair": native_pair, "pair": pair}
    t = median_times(fns, repeats)
    warm_for_edit()
    edit(), edit()
    t.update(median_times({"native_e": native, "edit": edit}, repeats))
    t["edit_ratio"] = t["edit"] / t["native_e"]
    n_seg = len(clip_segments.HostClipSegments(clip).encode(EXAMPLE_PROMPT)[1].segments)
    print(f"[ComfyUI {comfy_version()} CLIP object, {label}, {n_seg} segments; LongAlign Text Encode vs "
          f"CLIPTextEncode, medians of {repeats} interleaved runs]")
    rows = [("CLIPTextEncode (native)", t["native"], None, None),
            ("LongAlign, cold (new prompt)", t["cold"], t["cold"] / t["native"], cold_target),
            ("LongAlign, first prompt of a model state", t["first"], t["first"] / t["native"], None),
            ("CLIPTextEncode (native), during the edit runs", t["native_e"], None, None),
            ("LongAlign, one sentence edited", t["edit"], t["edit_ratio"], edit_target),
            ("positive + negative, native", t["native_pair"], None, None),
            ("positive + negative, LongAlign, cold", t["pair"], t["pair"] / t["native_pair"], None)]
    for name, sec, ratio, target in rows:
        line = f"  {name:<46}: {sec * 1e3:8.1f} ms"
        if ratio is not None:
            line += f"   ratio {ratio:5.2f}x"
        if target is not None:
            line += f" (target <= {target}x: {'met' if ratio <= target else 'NOT met'})"
        print(line)
    profile_split(clip, text_encode, longalign, edits, repeats)
    return {f"{model}_cold_ratio": t["cold"] / t["native"], f"{model}_edit_ratio": t["edit_ratio"]}


def profile_split(clip, text_encode, longalign, edits, repeats: int) -> None:
    """Where the time of a node call goes, per phase (the encoder's ``PhaseTimer``), mean over ``repeats``
    calls; the rest of the encoder's own time is "other Python in the encoder", the node's time minus the
    encoder's its glue (report text, logging)."""
    from longalign_core.phase_timer import PhaseTimer

    cache = text_encode.SEGMENT_CACHE
    phases = PhaseTimer()
    original = text_encode.HostClipSegments
    encoder_seconds = [0.0]

    def profiled(*args, **kwargs):
        t0 = time.perf_counter()
        encoder = original(*args, phases=phases, **kwargs)
        encode = encoder.encode

        def timed(*a, **k):
            t1 = time.perf_counter()
            try:
                return encode(*a, **k)
            finally:
                encoder_seconds[0] += time.perf_counter() - t1

        encoder.encode = timed
        encoder_seconds[0] += time.perf_counter() - t0
        return encoder

    native_split = {"tokenize": [], "encode": []}
    columns = {}
    text_encode.HostClipSegments = profiled
    try:
        for name in ("cold", "edit"):
            phases.reset()
            encoder_seconds[0] = node_time = 0.0
            for _ in range(repeats):
                if name == "cold":
                    cache.clear(segments_only=True)
                text = EXAMPLE_PROMPT if name == "cold" else next(edits)
                t0 = time.perf_counter()
                longalign(text)
                node_time += time.perf_counter() - t0
            split = {k: v / repeats for k, v in phases.seconds.items()}
            split["other Python in the encoder"] = encoder_seconds[0] / repeats - sum(split.values())
            split["node glue (report text, logging)"] = (node_time - encoder_seconds[0]) / repeats
            columns[name] = split
    finally:
        text_encode.HostClipSegments = original
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = clip.tokenize(EXAMPLE_PROMPT)
        t1 = time.perf_counter()
        clip.encode_from_tokens_scheduled(tokens)
        native_split["tokenize"].append(t1 - t0)
        native_split["encode"].append(time.perf_counter() - t1)
    names = list(dict.fromkeys([*columns["cold"], *columns["edit"]]))
    print(f"  where the time goes (ms, mean of {repeats} node calls): {'cold':>8} {'edit':>8}")
    for k in names:
        print(f"    {k:<52}{columns['cold'].get(k, 0.0) * 1e3:8.1f} {columns['edit'].get(k, 0.0) * 1e3:8.1f}")
    print(f"    {'sum':<52}{sum(columns['cold'].values()) * 1e3:8.1f} {sum(columns['edit'].values()) * 1e3:8.1f}")
    print(f"  CLIPTextEncode: tokenize {statistics.median(native_split['tokenize']) * 1e3:.1f} ms, encode "
          f"{statistics.median(native_split['encode']) * 1e3:.1f} ms (medians)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--models", default="sd15,sdxl", help="ComfyUI rows: sd15, sdxl or both (comma-separated)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers rows")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in COMFY_MODELS]
    if unknown:
        ap.error(f"--models {args.models}: unknown {unknown}; choose from {sorted(COMFY_MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import os
    import platform

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.no_transformers:
        for attention in ("sdpa", "eager"):
            bench_transformers(args.repeats, attention)

    if os.environ.get("COMFYUI_PATH"):
        for model in models:
            bench_comfy(args.repeats, model)
    else:
        print("[ComfyUI] skipped: set COMFYUI_PATH to a ComfyUI checkout")


if __name__ == "__main__":
    main()
