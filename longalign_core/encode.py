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


#: Largest ``--budget`` (the ComfyUI node's limit): conditioning is B × budget × 768 floats, and SD attends over
#: all of it at every step.
MAX_TOKEN_BUDGET = 4096
#: ``model_type`` values of a config.json that hold a CLIP text encoder.
CLIP_MODEL_TYPES = ("clip_text_model", "clip")


def _check_clip_text_config(config_file: Path) -> None:
    """Refuse, before loading anything, a config.json that is not a CLIP text encoder (a T5, an SDXL second
    encoder is fine: it is a CLIP)."""
    from .errors import BadModelFileError, read_text_file

    try:
        config = json.loads(read_text_file(config_file, "model config"))
    except json.JSONDecodeError as exc:
        raise BadModelFileError(f"{config_file}:{exc.lineno}: not valid JSON ({exc.msg}); download it again") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in CLIP_MODEL_TYPES:
        arch = ", ".join(config.get("architectures") or []) if isinstance(config, dict) else ""
        raise BadModelFileError(
            f"--model {config_file.parent}: config.json describes a {kind!r} model{f' ({arch})' if arch else ''}, "
            f"not a CLIP text encoder (model_type 'clip_text_model'). Give a Stable Diffusion 1.x/2.x folder "
            f"whose text_encoder/ is a CLIPTextModel, or a CLIPTextModel folder")


def load_encoder(model: str, clip_skip: int = 0, device: str = "cpu") -> CLIPSegmentEncoder:
    """A :class:`CLIPSegmentEncoder` from a diffusers SD folder, a CLIPTextModel folder, or a Hub id.

    A folder whose encoder is not a CLIP (a T5, say) is refused before any weight is read; so is one whose
    weights do not match its config (every weight missing is not an encoder)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from safetensors import SafetensorError

    from .errors import BadModelFileError, check_weights_folder, looks_local

    path = Path(model)
    subfolder = ""
    if path.is_dir():
        if (path / "text_encoder" / "config.json").is_file():
            subfolder = "text_encoder"
        elif not (path / "config.json").is_file():
            raise BadModelFileError(f"--model {path} holds neither text_encoder/config.json (a diffusers Stable "
                                    f"Diffusion folder) nor config.json (a CLIPTextModel folder)")
        _check_clip_text_config(path / subfolder / "config.json")
        check_weights_folder(path / subfolder, "--model", "download the model folder again")
    elif path.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        raise BadModelFileError(f"--model {path} is a single file; give the diffusers folder of the model (or its "
                                f"Hub id)")
    elif path.exists():
        raise BadModelFileError(f"--model {path} is not a folder; give a diffusers folder or a Hub id")
    elif looks_local(model):
        raise BadModelFileError(f"--model {path} not found; check the path")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        text_encoder, info = CLIPTextModel.from_pretrained(model, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = path / subfolder if path.is_dir() else model
        raise BadModelFileError(f"--model {where}: could not load a CLIPTextModel ({detail}); check the folder, "
                                f"or download it again") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise BadModelFileError(f"--model {path / subfolder if path.is_dir() else model}: {len(missing)} CLIP text "
                                f"encoder weights are missing from the weights file (e.g. {missing[:2]}); it is "
                                f"not this model's weights, or it is incomplete")
    text_encoder = text_encoder.eval().to(device)
    tok_kwargs = {"subfolder": "tokenizer"} if subfolder else {}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, **tok_kwargs)
    except (OSError, ValueError, TypeError):
        from .clip_vocab import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    return CLIPSegmentEncoder(tokenizer, text_encoder, clip_skip=clip_skip)


def read_prompts(args) -> list[str]:
    """The prompts of ``args``: the positional prompt, or ``--prompt-file`` (.txt or .jsonl)."""
    from .errors import BadConfigError, BadInputError, check_input_file, read_text_file

    if args.prompt_file:
        if args.prompt is not None:
            raise BadConfigError("give a prompt or --prompt-file, not both")
        path = check_input_file(args.prompt_file, "prompts file", "--prompt-file")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            from .io_utils import read_jsonl_texts

            return read_jsonl_texts(path, option="--prompt-file")
        if suffix in (".json", ".csv", ".tsv", ".safetensors", ".pt", ".png", ".jpg"):
            raise BadInputError(f"--prompt-file {path}: {suffix} files are not read; give a .txt (one prompt per "
                                f"line, or blocks separated by blank lines) or a .jsonl ({{\"prompt\": ...}} per line)")
        text = read_text_file(path, "prompts file", "--prompt-file")
        prompts = [p.strip() for p in text.split("\n\n") if p.strip()] if "\n\n" in text else [
            line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise BadInputError(f"--prompt-file {path} holds no prompts (only blank lines)")
        return prompts
    return [args.prompt if args.prompt is not None else EXAMPLE_PROMPT]


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else :class:`BadConfigError` naming ``--device``."""
    from .errors import BadConfigError

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadConfigError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadConfigError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadConfigError(f"--device {device}: MPS is not available here; use --device cpu")
    return device


def main(argv: list[str] | None = None) -> int:
    from .errors import check_output_path, check_positive

    ap = argparse.ArgumentParser(prog="python -m longalign_core.encode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", nargs="?", help="the prompt (default: a built-in 14-sentence example)")
    ap.add_argument("--prompt-file", help="prompts: .txt (one per line, or blocks separated by blank lines) or "
                                          ".jsonl with a 'prompt' field")
    ap.add_argument("--model", help="diffusers SD folder, CLIPTextModel folder or Hub id (default: embedded)")
    ap.add_argument("--budget", "--token-budget", dest="budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                    help=f"token budget (default 240, at most {MAX_TOKEN_BUDGET})")
    ap.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="extend",
                    help="prompt longer than the budget: extend (default), truncate (reference), error")
    ap.add_argument("--split-mode", choices=SPLIT_MODES, default="sentence", help="segment splitter")
    ap.add_argument("--long-sentences", choices=LONG_SEGMENT_POLICIES, default="split",
                    help="sentence over 75 tokens: split (default) or truncate (reference)")
    ap.add_argument("--clip-skip", type=int, default=0, help="0 = last layer; 1 = penultimate (+ final norm)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="segments per text-encoder forward (default: all in one forward)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the conditioning (B, L, C) to this .safetensors file")
    ap.add_argument("--report", help="write the per-prompt reports to this .json file")
    args = ap.parse_args(argv)

    # Every option and path is checked before the model loads: a mistake costs nothing and writes nothing.
    check_positive(args.budget, "--budget", MAX_TOKEN_BUDGET, "tokens of conditioning per prompt; 240 for LongSD")
    if args.batch_size is not None:
        check_positive(args.batch_size, "--batch-size")
    if args.clip_skip < 0:
        from .errors import BadConfigError

        raise BadConfigError(f"--clip-skip must be >= 0 (0 = last layer), got {args.clip_skip}")
    check_device(args.device)
    for option in ("out", "report"):
        if getattr(args, option):
            check_output_path(getattr(args, option), f"--{option}")
    if args.out and args.report and Path(args.out).resolve() == Path(args.report).resolve():
        from .errors import BadConfigError

        raise BadConfigError(f"--out and --report are the same file {args.out}; give two names")
    prompts = read_prompts(args)
    if args.model:
        encoder = load_encoder(args.model, args.clip_skip, args.device)
        source = args.model
    else:
        encoder = embedded_default_encoder()
        source = "embedded default (real CLIP tokenizer, CLIP-L-shaped text encoder with random weights)"
    encoder.batch_size = args.batch_size
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
    from .errors import run_cli

    sys.exit(run_cli(main, prog="python -m longalign_core.encode"))
