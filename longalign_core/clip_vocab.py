"""The real CLIP BPE tokenizer, built offline from the vocabulary that ships inside ``open_clip_torch``.

OpenAI's CLIP tokenizer (used by SD1.x, SD2.x, SDXL, CLIP-H, PickScore, Denscore) is one byte-level BPE with
49408 entries. ``open_clip`` ships its merge list (``bpe_simple_vocab_16e6.txt.gz``); this module writes the
``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads, so the embedded default and the
tests tokenize exactly as the released models do, with no download.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
START_ID = 49406
END_ID = 49407
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode character table (the standard byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def open_clip_bpe_path() -> Path:
    """Path of the BPE merge file inside the installed ``open_clip`` package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; `pip install open_clip_torch` provides the CLIP "
                                "BPE vocabulary")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}; reinstall open_clip_torch")
    return path


def write_clip_tokenizer_files(directory: str | os.PathLike, model_max_length: int = 77,
                               pad_token: str = END_TOKEN) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for ``CLIPTokenizer`` into ``directory``.

    ``pad_token`` is ``<|endoftext|>`` for SD1.x's tokenizer; SD2.x and SDXL's second encoder pad with ``"!"``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                          encoding="utf-8")
    config = {"model_max_length": model_max_length, "bos_token": START_TOKEN, "eos_token": END_TOKEN,
              "unk_token": END_TOKEN, "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer",
              "do_lower_case": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": pad_token}))
    return directory


def default_tokenizer_dir() -> Path:
    """A per-user cache folder holding the tokenizer files (written once)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "longalign" / "clip-tokenizer"
    return root


@lru_cache(maxsize=2)
def load_clip_tokenizer(pad_token: str = END_TOKEN):
    """``transformers.CLIPTokenizer`` with the real CLIP vocabulary, built offline (cached on disk)."""
    from transformers import CLIPTokenizer

    directory = default_tokenizer_dir() / ("pad-end" if pad_token == END_TOKEN else "pad-" + str(ord(pad_token[0])))
    if not (directory / "merges.txt").is_file():
        tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
        write_clip_tokenizer_files(tmp, pad_token=pad_token)
        from .io_utils import publish_dir

        publish_dir(tmp, directory)
    return CLIPTokenizer.from_pretrained(str(directory))
