"""Shared fixtures: tiny random-weight models from real configs, saved and reloaded in their real formats."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def tiny_clip_text_config(**overrides):
    """A CLIP-L-shaped text config shrunk in width and depth; vocabulary, positions and ids are the real ones."""
    from transformers import CLIPTextConfig

    cfg = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
               max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
               pad_token_id=49407, projection_dim=32)
    cfg.update(overrides)
    return CLIPTextConfig(**cfg)


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
