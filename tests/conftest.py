"""Shared fixtures: tiny random-weight models from real configs, saved and reloaded in their real formats."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# before torch first calls MKL: the same numbers at any memory alignment, as the trainer's entry points set it
# (trainer/__init__.py), so an in-process run and a subprocess or torchrun run give the same bytes
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The `comfyui` marker, the ComfyUI import check and version in the summary line (see comfy_support.py).
from comfy_support import (  # noqa: E402,F401
    pytest_collection_finish, pytest_collection_modifyitems, pytest_configure, pytest_report_header)
# The tiny CLIP configs live in standins/, shared with bench/; tests import them from here as well.
from standins.tiny_clip import tiny_clip_config, tiny_clip_text_config  # noqa: E402,F401


@pytest.fixture(scope="session")
def standin_checkpoints(tmp_path_factory):
    """SD1.5/SDXL-shaped single-file checkpoints, written once per session and hard-linked where tests need them."""
    from comfy_support import StandinCheckpoints

    return StandinCheckpoints(tmp_path_factory.mktemp("standin_checkpoints"))


@pytest.fixture(scope="session")
def clip_tokenizer():
    from longalign_core.clip_vocab import load_clip_tokenizer

    return load_clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory):
    """A tiny ``CLIPTextModel`` with random weights, written with ``save_pretrained`` and loaded back."""
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(tiny_clip_text_config()).eval()
    with torch.no_grad():  # make the random model less degenerate: spread the position embeddings
        getattr(model, "text_model", model).embeddings.position_embedding.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny_clip_text")
    model.save_pretrained(path)
    return CLIPTextModel.from_pretrained(path).eval()


@pytest.fixture(scope="session")
def segment_encoder(clip_tokenizer, tiny_text_encoder):
    from longalign_core import CLIPSegmentEncoder

    return CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer):
    """A Hugging Face ``CLIPModel`` folder as Denscore/PickScore ship: config + safetensors + tokenizer +
    preprocessor config."""
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(1)
    model = CLIPModel(tiny_clip_config()).eval()
    path = tmp_path_factory.mktemp("tiny_denscore")
    model.save_pretrained(path, safe_serialization=True)
    clip_tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """(checkpoint path, config path) of a tiny open_clip model saved as HPSv2 ships (``{"state_dict": …}``)."""
    import json

    import open_clip

    path = tmp_path_factory.mktemp("tiny_hps")
    cfg = path / "tiny-hps-ViT.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(2)
    model = open_clip.create_model("tiny-hps-ViT", pretrained=None)
    ckpt = path / "HPS_tiny.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)
    return ckpt, cfg


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    """A tiny T5 encoder folder as on the Hub: config + safetensors + tokenizer.json (a small Unigram model
    trained here with the `tokenizers` library, saved in T5's fast-tokenizer format)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    path = tmp_path_factory.mktemp("tiny_t5")
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    corpus = ["a red fox sits on a mossy rock", "behind it a waterfall drops into a pool",
              "the sky is orange and the sea is calm", "a lighthouse keeper climbs the stairs"] * 20
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(path)
    torch.manual_seed(4)
    cfg = T5Config(vocab_size=len(fast), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory):
    from longalign_core.t5_branch import TextAdapter

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("tiny_adapter")
    TextAdapter(in_dim=32, int_dim=24, out_dim=32).save_pretrained(path)
    return path
