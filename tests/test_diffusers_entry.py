"""SDXL segment encoding and the diffusers entry point, checked against transformers and diffusers themselves.

Tiny random-weight SD1.x and SDXL pipelines are built from real configs, written with ``save_pretrained`` and
loaded back with ``from_pretrained``; the tokenizers are the real CLIP BPE (SDXL's second one pads with "!").
"""

from __future__ import annotations

import copy

import pytest
import torch

from longalign_core.clip_vocab import load_clip_tokenizer
from longalign_core.diffusers_entry import load_longalign_lora, long_prompt_kwargs
from longalign_core.errors import BadConfigError, BadInputError
from longalign_core.lora import lora_targets, save_kohya
from longalign_core.sdxl_text import SDXLSegmentEncoder

from conftest import tiny_clip_text_config

SENTENCES = ["A red fox sits on a mossy rock.", "Behind it, a thin waterfall falls into a pool.",
             "The evening sky is pink and orange."]
PROMPT = " ".join(SENTENCES)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=64)


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    """A tiny SDXL pipeline (two text encoders, text_time UNet) saved and reloaded as a diffusers folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    te1 = CLIPTextModel(tiny_clip_text_config(num_hidden_layers=4))
    te2 = CLIPTextModelWithProjection(tiny_clip_text_config(num_hidden_layers=4, pad_token_id=0, projection_dim=32))
    for te in (te1, te2):  # spread position embeddings so positions matter in the random model
        with torch.no_grad():
            getattr(te, "text_model", te).embeddings.position_embedding.weight.normal_(0, 0.5)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        force_zeros_for_empty_prompt=True)
    path = tmp_path_factory.mktemp("tiny_sdxl")
    pipe.save_pretrained(path)
    return StableDiffusionXLPipeline.from_pretrained(path).to(torch.float32)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    """A tiny SD1.x pipeline saved and reloaded as a diffusers folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    te = CLIPTextModel(tiny_clip_text_config())
    with torch.no_grad():
        getattr(te, "text_model", te).embeddings.position_embedding.weight.normal_(0, 0.5)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=load_clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(path)
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def _encode_alone(tokenizer, model, text):
    """One sentence through transformers as SDXL does: padded to 77 with the tokenizer's own pad, penultimate
    hidden layer, no final norm. Returns (kept states (1 + content, C), the model output)."""
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    n = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])  # start + content positions
    return out.hidden_states[-2][0, :n], out


def test_sdxl_encoder_equals_each_sentence_encoded_alone_through_transformers(sdxl_pipe):
    p = sdxl_pipe
    parts, pads = [], []
    for tok, te in ((p.tokenizer, p.text_encoder), (p.tokenizer_2, p.text_encoder_2)):
        parts.append(torch.cat([_encode_alone(tok, te, s)[0] for s in SENTENCES]))
        empty = _encode_alone(tok, te, "")[1].hidden_states[-2][0]
        pads.append(empty[-60:].mean(0))
    n = parts[0].shape[0]
    expected = torch.cat([torch.cat([parts[i], pads[i].expand(240 - n, -1)]) for i in range(2)], dim=-1)
    pooled = _encode_alone(p.tokenizer_2, p.text_encoder_2, SENTENCES[0])[1].text_embeds[0]

    out = SDXLSegmentEncoder(p.tokenizer, p.text_encoder, p.tokenizer_2, p.text_encoder_2).encode(PROMPT)
    assert out.cond.shape == (1, 240, 64)
    torch.testing.assert_close(out.cond[0], expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.pooled[0], pooled, atol=2e-5, rtol=1e-4)
    # the two encoders pad with different ids (49407 vs 0), so their <pad*> differ: each must be its own
    assert not torch.allclose(pads[1], _encode_alone(p.tokenizer, p.text_encoder_2, "")[1].hidden_states[-2][0, -60:].mean(0))
    assert [s.text for s in out.reports[0].segments] == SENTENCES


def test_sdxl_keeps_a_content_token_that_equals_the_bigG_pad_id(sdxl_pipe):
    """bigG pads with id 0, which is also the BPE token "!" ("fox!_" holds one). Padding is dropped by position,
    not by id, so that token stays: each sentence's block, both halves, equals the sentence encoded alone."""
    p = sdxl_pipe
    sentences = ["A red fox!_ sits on a mossy rock.", "Behind it, a thin waterfall falls into a pool."]
    for tok in (p.tokenizer, p.tokenizer_2):  # the case under test: a 0 among the content ids of both tokenizers
        assert 0 in tok(sentences[0]).input_ids[1:-1]
    out = SDXLSegmentEncoder(p.tokenizer, p.text_encoder, p.tokenizer_2, p.text_encoder_2).encode(" ".join(sentences))
    assert [s.text for s in out.reports[0].segments] == sentences
    start = 0
    for s in sentences:
        l_block = _encode_alone(p.tokenizer, p.text_encoder, s)[0]
        g_block = _encode_alone(p.tokenizer_2, p.text_encoder_2, s)[0]
        n = l_block.shape[0]
        assert g_block.shape[0] == n
        torch.testing.assert_close(out.cond[0, start:start + n], torch.cat([l_block, g_block], dim=-1),
                                   atol=2e-5, rtol=1e-4)
        start += n
    assert start == out.reports[0].merged


def test_sdxl_bigG_reads_the_clip_bpe_ids_as_comfyui_and_sdxl_training_do(sdxl_pipe):
    """The rule for "!": both towers read the CLIP BPE ids of the text, so "!!" is one token (748) for bigG too.
    That is ComfyUI's SDXL CLIP (comfy/sdxl_clip.py: the bigG tokenizer is the CLIP-L vocabulary, padded with 0)
    and SDXL's own training code (Stability's sgm FrozenOpenCLIPEmbedder2: open_clip.tokenize). diffusers'
    tokenizer_2 makes every "!" its pad token (id 0), "!!" two tokens; there our bigG half differs from
    encode_prompt's, the CLIP-L half does not. Expected values: open_clip's tokenizer + transformers, here."""
    import open_clip

    p = sdxl_pipe
    text = "A small fox holds a sign that says hooray!!"
    ids = open_clip.tokenize([text])  # (1, 77): start, content, end, then 0s
    n = int(ids[0].argmax())  # the end token (the largest id): start + content before it
    assert ids[0, :n + 1].tolist() == p.tokenizer(text).input_ids  # CLIP-L's tokenizer gives the same ids
    assert p.tokenizer_2(text).input_ids != p.tokenizer(text).input_ids  # diffusers' tokenizer_2 does not
    with torch.no_grad():
        g = p.text_encoder_2(ids, output_hidden_states=True)
    expected_g, expected_pooled = g.hidden_states[-2][0, :n], g.text_embeds[0]

    out = SDXLSegmentEncoder(p.tokenizer, p.text_encoder, p.tokenizer_2, p.text_encoder_2).encode(text)
    assert out.reports[0].merged == n
    c = p.text_encoder.config.hidden_size  # channels of the CLIP-L half
    torch.testing.assert_close(out.cond[0, :n, c:], expected_g, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.pooled[0], expected_pooled, atol=2e-5, rtol=1e-4)
    embeds, _, pooled, _ = p.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(out.cond[0, :n, :c], embeds[0, :n, :c], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out.cond[0, :n, c:], embeds[0, :n, c:], atol=1e-3)
    assert not torch.allclose(out.pooled, pooled, atol=1e-3)


def test_sdxl_single_sentence_matches_diffusers_encode_prompt(sdxl_pipe):
    """For a prompt that fits one segment, the kept positions and the pooled vector are SDXL's usual ones."""
    text = SENTENCES[1]
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
    kwargs, reports = long_prompt_kwargs(sdxl_pipe, text)
    n = reports[0].merged
    torch.testing.assert_close(kwargs["prompt_embeds"][0, :n], embeds[0, :n], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(kwargs["pooled_prompt_embeds"], pooled, atol=2e-5, rtol=1e-4)


def test_sdxl_clip_skip_reads_an_earlier_layer(sdxl_pipe):
    """diffusers' SDXL clip_skip=k reads hidden_states[-(k + 2)]; so must we."""
    text = SENTENCES[0]
    embeds, *_ = sdxl_pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False, clip_skip=1)
    kwargs, reports = long_prompt_kwargs(sdxl_pipe, text, clip_skip=1)
    n = reports[0].merged
    torch.testing.assert_close(kwargs["prompt_embeds"][0, :n], embeds[0, :n], atol=2e-5, rtol=1e-4)
    plain, _ = long_prompt_kwargs(sdxl_pipe, text)
    assert not torch.allclose(plain["prompt_embeds"][0, :n], embeds[0, :n], atol=1e-3)


def test_sd15_kwargs_match_diffusers_encode_prompt_per_sentence(sd_pipe):
    kwargs, reports = long_prompt_kwargs(sd_pipe, PROMPT, "blurry, low quality")
    assert set(kwargs) == {"prompt_embeds", "negative_prompt_embeds"}
    start = 0
    for s in SENTENCES:  # each sentence's kept block equals diffusers' own encode of that sentence alone
        ref, _ = sd_pipe.encode_prompt(s, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        n = len(sd_pipe.tokenizer(s).input_ids) - 1
        torch.testing.assert_close(kwargs["prompt_embeds"][0, start:start + n], ref[0, :n], atol=2e-5, rtol=1e-4)
        start += n
    assert start == reports[0].merged
    neg_ref, _ = sd_pipe.encode_prompt("blurry, low quality", device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
    m = reports[1].merged
    torch.testing.assert_close(kwargs["negative_prompt_embeds"][0, :m], neg_ref[0, :m], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("overflow", ["extend", "truncate", "error"])
def test_long_caption_positive_and_negative_always_combine(sdxl_pipe, overflow):
    """A ~700-token caption against a short negative: the pipelines require equal shapes, for every overflow mode
    (error raises instead, naming the budget)."""
    caption = " ".join(f"Detail number {i} shows a small brass lantern hanging beside a blue wooden door."
                       for i in range(50))
    if overflow == "error":
        with pytest.raises(ValueError, match="token budget is 240"):
            long_prompt_kwargs(sdxl_pipe, caption, "blurry", overflow=overflow)
        return
    kwargs, reports = long_prompt_kwargs(sdxl_pipe, caption, "blurry", overflow=overflow)
    assert reports[0].merged > 600
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape
    length = kwargs["prompt_embeds"].shape[1]
    if overflow == "extend":
        assert length % 240 == 0 and length >= reports[0].merged and reports[0].lossless
    else:
        assert length == 240 and reports[0].dropped == reports[0].merged - 240


def test_sdxl_none_negative_is_zeros_like_diffusers(sdxl_pipe):
    kwargs, _ = long_prompt_kwargs(sdxl_pipe, PROMPT)
    _, neg, _, neg_pooled = sdxl_pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    assert torch.count_nonzero(neg) == 0 and torch.count_nonzero(kwargs["negative_prompt_embeds"]) == 0
    assert torch.count_nonzero(neg_pooled) == 0 and torch.count_nonzero(kwargs["negative_pooled_prompt_embeds"]) == 0
    kwargs, _ = long_prompt_kwargs(sdxl_pipe, PROMPT, "")
    assert torch.count_nonzero(kwargs["negative_prompt_embeds"]) > 0


def test_bad_prompts_are_named(sd_pipe):
    with pytest.raises(BadInputError, match="2 prompts but 3 negative"):
        long_prompt_kwargs(sd_pipe, ["a", "b"], ["x", "y", "z"])
    with pytest.raises(BadInputError, match="prompt 1 is a int"):
        long_prompt_kwargs(sd_pipe, ["a", 3])


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_pipelines_run_with_the_kwargs(which, sd_pipe, sdxl_pipe):
    """The pipelines accept the kwargs, and both the prompt and the negative prompt reach the UNet."""
    import numpy as np

    pipe = sd_pipe if which == "sd" else sdxl_pipe
    pipe.set_progress_bar_config(disable=True)

    def run(prompt, negative="blurry"):
        kwargs, _ = long_prompt_kwargs(pipe, prompt, negative)
        return pipe(**kwargs, num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    a, a2, b = run(PROMPT), run(PROMPT), run("A green frog on a leaf. Rain falls.")
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    assert (a == a2).all()  # same prompt and seed → same image
    assert abs(a - b).max() > 1e-4  # the prompt's conditioning reaches the UNet
    assert abs(a - run(PROMPT, "sharp, high quality")).max() > 1e-4  # so does the negative's (guidance 7.5)


# --------------------------------------------------------------------------------------------------------------
# LoRA into a pipeline


def _random_pairs(unet, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for t in lora_targets(unet):
        out_ch, in_ch = t.weight_shape[0], t.weight_shape[1]
        if t.kind == "conv":
            down = torch.randn(rank, in_ch, *t.weight_shape[2:], generator=g) * 0.05
            up = torch.randn(out_ch, rank, 1, 1, generator=g) * 0.05
        else:
            down, up = torch.randn(rank, in_ch, generator=g) * 0.05, torch.randn(out_ch, rank, generator=g) * 0.05
        pairs[t.path] = (up.half().float(), down.half().float())  # exactly representable in the fp16 file
    return pairs


def _merged_copy(unet, pair_sets):
    """W + Σ s·(up.flatten(1) @ down.flatten(1)) written out here, independent of the loader."""
    ref = copy.deepcopy(unet)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for pairs, s in pair_sets:
            for path, (up, down) in pairs.items():
                w = mods[path].weight
                w += s * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return ref


def _unet_out(unet, pipe):
    torch.manual_seed(3)
    sample = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 7, unet.config.cross_attention_dim)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        return unet(sample, 500, ctx, **kw).sample


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_lora_adapter_equals_written_out_merge_and_stacks(which, sd_pipe, sdxl_pipe, tmp_path):
    pipe = copy.deepcopy(sd_pipe if which == "sd" else sdxl_pipe)
    base_unet = copy.deepcopy(pipe.unet)
    first, second = _random_pairs(pipe.unet, seed=1), _random_pairs(pipe.unet, rank=2, seed=2)
    f1, f2 = save_kohya(first, tmp_path / "one.safetensors"), save_kohya(second, tmp_path / "two.safetensors")
    base = _unet_out(pipe.unet, pipe)

    name1 = load_longalign_lora(pipe, f1, strength=0.5)
    torch.testing.assert_close(_unet_out(pipe.unet, pipe), _unet_out(_merged_copy(base_unet, [(first, 0.5)]), pipe),
                               atol=1e-4, rtol=1e-4)
    name2 = load_longalign_lora(pipe, f2)
    assert name1 != name2
    stacked = _unet_out(_merged_copy(base_unet, [(first, 0.5), (second, 1.0)]), pipe)
    torch.testing.assert_close(_unet_out(pipe.unet, pipe), stacked, atol=1e-4, rtol=1e-4)
    assert abs(stacked - base).max() > 1e-3  # the LoRA changes the output at all
    pipe.unet.disable_adapters()
    torch.testing.assert_close(_unet_out(pipe.unet, pipe), base, atol=1e-5, rtol=1e-5)


def test_longsd_pt_list_fuses_into_sd_unet(sd_pipe, tmp_path):
    """The released LongSD format: a plain list [up_0, down_0, …] in LongSD module order, read safely."""
    pipe = copy.deepcopy(sd_pipe)
    base_unet = copy.deepcopy(pipe.unet)
    pairs = _random_pairs(pipe.unet, seed=4)
    tensors = [t.half() for target in lora_targets(pipe.unet) for t in pairs[target.path]]
    torch.save(tensors, tmp_path / "longsd.pt")
    load_longalign_lora(pipe, tmp_path / "longsd.pt", fuse=True)
    assert not getattr(pipe.unet, "peft_config", None)
    torch.testing.assert_close(_unet_out(pipe.unet, pipe), _unet_out(_merged_copy(base_unet, [(pairs, 1.0)]), pipe),
                               atol=1e-4, rtol=1e-4)


def test_lora_bad_strength_and_wrong_model(sd_pipe, sdxl_pipe, tmp_path):
    f = save_kohya(_random_pairs(sdxl_pipe.unet), tmp_path / "xl.safetensors")
    with pytest.raises(BadConfigError, match="finite"):
        load_longalign_lora(copy.deepcopy(sd_pipe), f, strength=float("nan"))
    with pytest.raises(ValueError):  # an SDXL LoRA does not fit an SD1.x UNet: refused, nothing half-applied
        load_longalign_lora(copy.deepcopy(sd_pipe), f)
