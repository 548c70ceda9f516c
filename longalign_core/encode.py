"""Encode long prompts segment by segment from the command line.

    python -m longalign_core.encode                          # embedded default: built-in prompt, built-in encoder
    python -m longalign_core.encode "A red fox. A blue bird." --model /path/to/stable-diffusion-v1-5
    python -m longalign_core.encode --prompt-file prompts.txt --model openai/clip-vit-large-patch14 \\
        --out cond.safetensors --report report.json

``--model`` takes a local diffusers Stable Diffusion folder (``text_encoder/`` + ``tokenizer/``), a local
``CLIPTextModel`` folder, or (online) a Hugging Face id of either. Without ``--model`` the embedded default is
used: the real CLIP tokenizer (built offline from open_clip's vocabulary) and a CLIP-L-shaped text encoder with
random weights — the segments, token counts, layout and report are real; the embedding values are not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .clip_text import CLIPSegmentEncoder
from .examples import EXAMPLE_PROMPT
from .segment_encoding import DEFAULT_TOKEN_BUDGET, OVERFLOW_POLICIES
from .segmentation import LONG_SEGMENT_POLICIES, SPLIT_MODES


def embedded_default_encoder(seed: int = 0) -> CLIPSegmentEncoder:
    """Real CLIP tokenizer + a random-weight CLIP-L-shaped ``CLIPTextModel`` (no download)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_vocab import load_clip_tokenizer

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPSegmentEncoder(load_clip_tokenizer(), CLIPTextModel(config).eval())


def load_encoder(model: str, clip_skip: int = 0, device: str = "cpu") -> CLIPSegmentEncoder:
    """A :class:`CLIPSegmentEncoder` from a diffusers SD folder, a CLIPTextModel folder, or a Hub id."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(model)
    subfolder = ""
    if path.is_dir():
        if (path / "text_encoder" / "config.json").is_file():
            subfolder = "text_encoder"
        elif not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds neither text_encoder/config.json (a diffusers Stable Diffusion "
                                    f"folder) nor config.json (a CLIPTextModel folder)")
    elif path.suffix in (".safetensors", ".ckpt", ".pt"):
        raise ValueError(f"{path} is a single file; give the diffusers folder of the model (or its Hub id)")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder=subfolder or None).eval().to(device)
    tok_sub = "tokenizer" if subfolder else None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder=tok_sub)
    except (OSError, ValueError, TypeError):
        from .clip_vocab import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    return CLIPSegmentEncoder(tokenizer, text_encoder, clip_skip=clip_skip)


def read_prompts(args) -> list[str]:
    if args.prompt_file:
        text = Path(args.prompt_file).read_text(encoding="utf-8")
        if args.prompt_file.endswith(".jsonl"):
            from .io_utils import read_jsonl_texts

            return read_jsonl_texts(args.prompt_file)
        return [p for p in text.split("\n\n") if p.strip()] if "\n\n" in text else [
            line for line in text.splitlines() if line.strip()]
    return [args.prompt if args.prompt is not None else EXAMPLE_PROMPT]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m longalign_core.encode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="the prompt (default: a built-in 14-sentence example)")
    ap.add_argument("--prompt-file", help="prompts: .txt (one per line, or blocks separated by blank lines) or "
                                          ".jsonl with a 'prompt' field")
    ap.add_argument("--model", help="diffusers SD folder, CLIPTextModel folder or Hub id (default: embedded)")
    ap.add_argument("--budget", type=int, default=DEFAULT_TOKEN_BUDGET, help="token budget (default 240)")
    ap.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="extend",
                    help="prompt longer than the budget: extend (default), truncate (reference), error")
    ap.add_argument("--split-mode", choices=SPLIT_MODES, default="sentence", help="segment splitter")
    ap.add_argument("--long-sentences", choices=LONG_SEGMENT_POLICIES, default="split",
                    help="sentence over 75 tokens: split (default) or truncate (reference)")
    ap.add_argument("--clip-skip", type=int, default=0, help="0 = last layer; 1 = penultimate (+ final norm)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the conditioning (B, L, C) to this .safetensors file")
    ap.add_argument("--report", help="write the per-prompt reports to this .json file")
    args = ap.parse_args(argv)

    prompts = read_prompts(args)
    if not prompts:
        ap.error("no prompts found")
    if args.model:
        encoder = load_encoder(args.model, args.clip_skip, args.device)
        source = args.model
    else:
        encoder = embedded_default_encoder()
        source = "embedded default (real CLIP tokenizer, CLIP-L-shaped text encoder with random weights)"
    result = encoder.encode(prompts, budget=args.budget, overflow=args.overflow, split_mode=args.split_mode,
                            long_segments=args.long_sentences)
    print(f"encoder: {source}")
    for b, report in enumerate(result.reports):
        print(f"\nprompt {b + 1}/{len(prompts)}:")
        print(report.format())
    print(f"\nconditioning: {tuple(result.cond.shape)} {result.cond.dtype}")
    if args.out:
        from safetensors.torch import save_file

        from .io_utils import atomic_path

        with atomic_path(args.out) as tmp:
            save_file({"cond": result.cond.contiguous().cpu()}, tmp, metadata={
                "format": "longalign-segment-conditioning", "budget": str(args.budget), "model": source})
        print(f"wrote {args.out}")
    if args.report:
        from dataclasses import asdict

        from .io_utils import atomic_path

        with atomic_path(args.report) as tmp:
            Path(tmp).write_text(json.dumps([{**asdict(r), "lossless": r.lossless, "warnings": r.warnings()}
                                             for r in result.reports], indent=1, ensure_ascii=False))
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
