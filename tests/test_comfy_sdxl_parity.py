"""The Python SDXL encoder (transformers) and the LongAlign Text Encode node (ComfyUI's CLIP object) give the same
numbers on the same SDXL text-encoder weights, also for a prompt with "!" (where diffusers' tokenizer_2 differs).
Skips unless COMFYUI_PATH is set."""

import sys

import torch

from comfy_support import CLIP_SHAPES, import_comfy, load_pack, random_clip_text_state_dict, requires_comfy

pytestmark = requires_comfy

PROMPT = ("A lighthouse stands on a black cliff at dusk. Waves break white against the rocks below! "
          "Two gulls circle the lamp; a fishing boat with a red hull heads home. The sky is violet.")
#: "!" in CLIP's BPE: "!_" holds id 0 (bigG's pad id), "!!" is one token that diffusers' tokenizer_2 splits in two.
BANG_PROMPT = "A red fox!_ sits on a mossy rock. A sign beside it says hooray!! Behind it the sky is pink!"


def _transformers_encoder(kind, state, with_projection):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407 if kind == "l" else 0, **CLIP_SHAPES[kind])
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()
    own = set(model.state_dict())
    fixed = {}
    for key, value in state.items():  # the helper writes ComfyUI's "text_model." prefix; transformers 5 has none
        if key not in own and key.startswith("text_model."):
            key = key[len("text_model."):]
        fixed[key] = value
    missing, unexpected = model.load_state_dict(fixed, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


def test_sdxl_encoder_equals_node_on_the_same_weights():
    comfy = import_comfy()
    from longalign_core.clip_vocab import load_clip_tokenizer
    from longalign_core.sdxl_text import SDXLSegmentEncoder

    pack = load_pack()
    node = sys.modules[pack.__name__ + ".nodes.text_encode"].LongAlignTextEncode
    g = random_clip_text_state_dict("g", 11, with_projection=True)
    l_state = random_clip_text_state_dict("l", 12)
    clip = comfy.sd.load_text_encoder_state_dicts([g, l_state], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                  model_options={"dtype": torch.float32})
    encoder = SDXLSegmentEncoder(load_clip_tokenizer(), _transformers_encoder("l", l_state, False),
                                 load_clip_tokenizer(pad_token="!"), _transformers_encoder("g", g, True))
    for prompt, segments in ((PROMPT, 5), (BANG_PROMPT, 3)):  # "; " ends a segment too
        out = node.execute(clip=clip, text=prompt, token_budget=240, overflow="extend", split_mode="sentence",
                           long_sentences="split")
        (node_cond, extra), = out.args[0]
        ours = encoder.encode(prompt)
        assert ours.cond.shape == node_cond.shape == (1, 240, 2048)
        assert len(ours.reports[0].segments) == segments
        torch.testing.assert_close(ours.cond, node_cond, atol=5e-4, rtol=1e-3)
        torch.testing.assert_close(ours.pooled, extra["pooled_output"], atol=5e-4, rtol=1e-3)
