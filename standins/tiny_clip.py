"""Tiny CLIP configs: CLIP-L's text tower shrunk in width and depth, and a two-tower ``CLIPConfig`` around it (as
Denscore / PickScore ship), with the real vocabulary, text positions and special token ids, so the real tokenizer
feeds them. Used by the tests' fixtures (``tests/conftest.py``) and ``bench/train_node.py``."""

from __future__ import annotations


def tiny_clip_text_config(**overrides):
    """A CLIP-L-shaped text config shrunk in width and depth; vocabulary, positions and ids are the real ones."""
    from transformers import CLIPTextConfig

    cfg = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
               max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
               pad_token_id=49407, projection_dim=32)
    cfg.update(overrides)
    return CLIPTextConfig(**cfg)


def tiny_clip_config():
    """A tiny two-tower ``CLIPConfig`` (real vocabulary and text positions; 32 px images, 8 px patches)."""
    from transformers import CLIPConfig

    text = tiny_clip_text_config().to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
