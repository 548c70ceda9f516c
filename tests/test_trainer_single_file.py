"""The trainer's single-file loader (SD1.x and SDXL), offline, on checkpoints written here without ComfyUI:
random diffusers/transformers models renamed to the original Stable Diffusion / SDXL keys by the mapping tables
of :mod:`standins.single_file`, loaded back with the configs inferred from the file's own shapes."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_support import import_comfy, requires_comfy
from standins.single_file import (VAE_CONFIG, clip_hf_layout, clip_open_clip_layout, unet_ldm_shapes, unet_to_ldm,
                                  vae_to_ldm)
from trainer_support import one_thread, run_module  # noqa: F401  (one_thread: autouse fixture)


def fp16_exact(model):
    """Round the weights to fp16 and back, so the fp16 checkpoint holds exactly this model."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def save_checkpoint(sd: dict, path) -> dict:
    sd = {k: v.half().contiguous() for k, v in sd.items()}
    save_file(sd, str(path))
    return sd


# ------------------------------------------------------------------------------------------------------------
# UNet configs inferred from the shapes of the published models


def _shaping_fields(config: dict) -> dict:
    """Every field of the config diffusers builds (defaults filled in), minus bookkeeping."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        built = UNet2DConditionModel.from_config(config).config
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in built.items() if not k.startswith("_")}


def test_sdxl_unet_config_inferred_from_shapes_is_the_published_one():
    from test_sdxl_lora import SDXL_DIFFUSERS

    from trainer.loading.checkpoint_configs import unet_config_from_shapes

    shapes = unet_ldm_shapes(SDXL_DIFFUSERS)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    inferred = unet_config_from_shapes(shapes, "sdxl")
    assert _shaping_fields(inferred) == _shaping_fields(SDXL_DIFFUSERS)
    assert "reverse_transformer_layers_per_block" not in inferred
    # the LDM reading is ComfyUI's description of SDXL base (its output depths listed outermost level first)
    from test_sdxl_lora import SDXL_LDM

    from trainer.loading.checkpoint_configs import ldm_unet_config_from_shapes

    ldm = ldm_unet_config_from_shapes(shapes)
    assert ldm == {k: SDXL_LDM[k] for k in ldm}


def test_sd15_unet_config_inferred_from_shapes_is_the_published_one():
    from longalign_core.lora import load_unet_config
    from trainer.loading.checkpoint_configs import unet_config_from_shapes

    published = load_unet_config()
    shapes = unet_ldm_shapes(published)
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in shapes  # SD1.5's first upsampler
    assert _shaping_fields(unet_config_from_shapes(shapes, "sd1")) == _shaping_fields(published)


def test_text_encoder_configs_inferred_from_full_size_shapes_are_the_published_ones():
    """CLIP-L in Hugging Face layout and bigG in open_clip layout (open_clip's own text tower, on the meta
    device) read as SDXL's text_encoder / text_encoder_2 config.json (stabilityai/stable-diffusion-xl-base-1.0)."""
    from open_clip.transformer import TextTransformer
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.loading.checkpoint_configs import clip_text_config_from_shapes

    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12))
        bigg = TextTransformer(context_length=77, vocab_size=49408, width=1280, heads=20, layers=32, mlp_ratio=4,
                               output_dim=1280)
    shapes = {k: tuple(v.shape) for k, v in clip_hf_layout(clip_l, "l.").items()}
    shapes.update({"g." + k: tuple(v.shape) for k, v in bigg.state_dict().items()})
    published = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    assert clip_text_config_from_shapes(shapes, "l.text_model.", "hf", "clip_l") == dict(
        published, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", projection_dim=768)
    assert clip_text_config_from_shapes(shapes, "g.", "open_clip", "bigg") == dict(
        published, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280)


def test_asymmetric_depths_are_inferred_per_block():
    """Up blocks deeper than their down blocks (diffusers' reverse_transformer_layers_per_block) and a middle
    block diffusers cannot build with its own depth."""
    from longalign_core.errors import BadModelFileError
    from trainer.loading.checkpoint_configs import unet_config_from_shapes

    config = dict(TINY_SDXL_UNET, reverse_transformer_layers_per_block=[[3, 3], [1, 1]])
    inferred = unet_config_from_shapes(unet_ldm_shapes(config), "sdxl")
    assert _shaping_fields(inferred) == _shaping_fields(config)
    shapes = unet_ldm_shapes(TINY_SDXL_UNET)
    shapes = {k: v for k, v in shapes.items() if ".middle_block.1.transformer_blocks.1." not in k}
    with pytest.raises(BadModelFileError, match="middle block has 1 transformer blocks but its last level 2"):
        unet_config_from_shapes(shapes, "sdxl", "mid.safetensors")


# ------------------------------------------------------------------------------------------------------------
# Loading tiny checkpoints of both families


@pytest.fixture
def offline(monkeypatch):
    """Hub offline mode, and any attempt to open a network connection fails the test."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(self, address, *args):
        raise AssertionError(f"network access to {address} while loading a single-file checkpoint")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_sd15_single_file_checkpoint_loads_offline(tmp_path, offline):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.loading.single_file import load_single_file

    # one level, model_channels 320: SD1.x's layout shrunk (8 heads, 32 groups as SD1.5)
    unet_cfg = dict(block_out_channels=[320], layers_per_block=1, down_block_types=["CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D"], cross_attention_dim=64, attention_head_dim=8,
                    norm_num_groups=32)
    torch.manual_seed(0)
    unet = fp16_exact(UNet2DConditionModel(**unet_cfg))
    vae = AutoencoderKL(**VAE_CONFIG)
    text = fp16_exact(CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=1, hidden_act="quick_gelu")))
    sd = {unet_to_ldm(k, 1, [True]): v for k, v in unet.state_dict().items()}
    sd.update(dict(vae_to_ldm(k, v) for k, v in vae.state_dict().items()))
    sd.update(clip_hf_layout(text, "cond_stage_model.transformer."))
    path = tmp_path / "tiny_sd15.safetensors"
    save_checkpoint(sd, path)

    base = load_single_file(str(path))
    assert not base.is_sdxl and base.vae.config.scaling_factor == 0.18215
    loaded_unet = base.unet.state_dict()
    for k, v in unet.state_dict().items():  # every UNet weight arrived where diffusers keeps it
        torch.testing.assert_close(loaded_unet[k].float(), v, msg=k)
    loaded_vae = base.vae.state_dict()
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(loaded_vae[k].float().reshape(v.shape), v.half().float(), msg=k)
    ids = base.tokenizer(["a red fox in the snow"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        ours = base.text_encoder.float()(ids, output_hidden_states=True)
        theirs = text(ids, output_hidden_states=True)
    torch.testing.assert_close(ours.hidden_states[-1], theirs.hidden_states[-1])
    # the same file as a Lightning-style .ckpt (read with weights_only=True) loads the same weights
    ckpt = tmp_path / "tiny_sd15.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 1}, ckpt)
    from_ckpt = load_single_file(ckpt).unet.state_dict()
    for k, v in loaded_unet.items():
        torch.testing.assert_close(from_ckpt[k], v, msg=k)


#: A tiny SDXL-architecture UNet: text_time conditioning with SDXL's 2816 inputs, 64 channels per head, linear
#: projections, no attention on the first level, the middle as deep as the last level.
TINY_SDXL_UNET = dict(block_out_channels=[64, 128], layers_per_block=1,
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2],
                      attention_head_dim=[1, 2], cross_attention_dim=64 + 128, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816, norm_num_groups=32, sample_size=128)


def build_tiny_sdxl(tmp_path, seed: int = 0, bigg_layout=clip_open_clip_layout, markers=()):
    """(path, unet, vae, clip_l, clip_g) of a tiny SDXL single-file checkpoint in the real SDXL layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = fp16_exact(UNet2DConditionModel(**TINY_SDXL_UNET))
    vae = AutoencoderKL(**VAE_CONFIG)
    # CLIP-L and bigG as published but small: 64 channels per head, quick_gelu / gelu, legacy eos id 2 (pooled
    # output at the highest token id, as open_clip), bigG's projection narrower than its width
    clip_l = fp16_exact(CLIPTextModel(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1)))
    clip_g = fp16_exact(CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu",
        projection_dim=96, bos_token_id=0, eos_token_id=2, pad_token_id=1)))
    sd = {unet_to_ldm(k, 1, [True, False]): v for k, v in unet.state_dict().items()}
    sd.update(dict(vae_to_ldm(k, v) for k, v in vae.state_dict().items()))
    sd.update(clip_hf_layout(clip_l, "conditioner.embedders.0.transformer."))
    sd.update(bigg_layout(clip_g, "conditioner.embedders.1.model."))
    sd.update({name: torch.zeros(()) for name in markers})  # e.g. NoobAI-XL V-Pred's "v_pred", "ztsnr"
    path = tmp_path / f"tiny_sdxl_{seed}.safetensors"
    save_checkpoint(sd, path)
    return path, unet, vae, clip_l, clip_g


def test_sdxl_single_file_checkpoint_loads_offline(tmp_path, offline):
    from diffusers import DDPMScheduler

    from trainer.loading.single_file import load_single_file

    path, unet, vae, clip_l, clip_g = build_tiny_sdxl(tmp_path)
    stored = load_file(str(path))
    assert stored["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (384, 128)

    base = load_single_file(path)
    assert base.is_sdxl and base.source == str(path)
    assert base.vae.config.scaling_factor == 0.13025 and base.vae.config.force_upcast
    assert isinstance(base.noise_scheduler, DDPMScheduler)
    assert base.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert base.tokenizer_2.pad_token == "!" and base.tokenizer.pad_token == "<|endoftext|>"
    loaded_unet = base.unet.state_dict()
    assert loaded_unet.keys() == unet.state_dict().keys()
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(loaded_unet[k].float(), v, msg=k)
    loaded_vae = base.vae.state_dict()
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(loaded_vae[k].float().reshape(v.shape), v.half().float(), msg=k)
    # the text encoders compute what the originals compute: SDXL's penultimate hidden states, bigG's projection
    for tok in (base.tokenizer, base.tokenizer_2):
        ids = tok(["a red fox in the snow, a small house behind it"], padding="max_length", max_length=77,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            ours_l = base.text_encoder.float()(ids, output_hidden_states=True)
            theirs_l = clip_l(ids, output_hidden_states=True)
            ours_g = base.text_encoder_2.float()(ids, output_hidden_states=True)
            theirs_g = clip_g(ids, output_hidden_states=True)
        torch.testing.assert_close(ours_l.hidden_states[-2], theirs_l.hidden_states[-2])
        torch.testing.assert_close(ours_g.hidden_states[-2], theirs_g.hidden_states[-2])
        torch.testing.assert_close(ours_g.text_embeds, theirs_g.text_embeds)
        assert ours_g.text_embeds.shape == (1, 96)
    # the stored bigG is open_clip's own layout: open_clip's text tower takes it as is and pools/projects alike
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(context_length=77, vocab_size=49408, width=128, heads=2, layers=3, mlp_ratio=2,
                            output_dim=96)
    prefix = "conditioner.embedders.1.model."
    tower.load_state_dict({k[len(prefix):]: v.float() for k, v in stored.items() if k.startswith(prefix)})
    with torch.no_grad():
        torch.testing.assert_close(tower.eval()(ids), ours_g.text_embeds)


def test_sdxl_bigg_in_hugging_face_layout_is_not_read_as_open_clip(tmp_path):
    """A file whose bigG is not in open_clip layout is not an SDXL checkpoint as published: refused by name."""
    from longalign_core.errors import BadModelFileError
    from trainer.loading.single_file import checkpoint_family, read_checkpoint_shapes

    def hf_layout(model, prefix):
        return clip_hf_layout(model, prefix.replace(".model.", ".transformer."))

    path, *_ = build_tiny_sdxl(tmp_path, bigg_layout=hf_layout)
    with pytest.raises(BadModelFileError) as err:
        checkpoint_family(read_checkpoint_shapes(path), path)
    assert str(path) in str(err.value) and "open_clip layout under conditioner.embedders.1.model" in str(err.value)
    assert "conditioner.embedders.1.transformer" in str(err.value)


def test_sdxl_v_prediction_marker_sets_the_scheduler(tmp_path, offline):
    """A v-prediction SDXL fine-tune (NoobAI-XL V-Pred marks itself with ``v_pred`` and ``ztsnr`` tensors, which
    ComfyUI reads) loads with a v-prediction, zero-terminal-SNR noise scheduler; an unmarked file stays epsilon."""
    from trainer.loading.single_file import load_single_file

    path, *_ = build_tiny_sdxl(tmp_path, seed=1, markers=("v_pred", "ztsnr"))
    scheduler = load_single_file(path).noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1] < 1e-7  # zero terminal SNR (scaled_linear alone ends at ~0.0047)
    plain = load_single_file(build_tiny_sdxl(tmp_path, seed=2)[0]).noise_scheduler
    assert plain.config.prediction_type == "epsilon" and plain.alphas_cumprod[-1] > 1e-3


# ------------------------------------------------------------------------------------------------------------
# Files that are not SD1.x/SDXL checkpoints: one message naming the file, what it looks like, what works


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_KEYS = {"first_stage_model.encoder.conv_in.weight": (1,), "first_stage_model.decoder.conv_in.weight": (1,)}

#: What family detection reads of an SDXL base file (CLIP-L, bigG, 2816-channel extra conditioning, VAE).
SDXL_KEYS = {UNET_IN: (1,), "model.diffusion_model.label_emb.0.0.weight": (1, 2816),
             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (1,),
             "conditioner.embedders.1.model.token_embedding.weight": (1,), **VAE_KEYS}

NOT_SUPPORTED = {
    "sd2": ({UNET_IN: (1,), "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (1,)},
            "Stable Diffusion 2.x"),
    "refiner": ({UNET_IN: (1,), "model.diffusion_model.label_emb.0.0.weight": (1, 2560),
                 "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": (1,)}, "SDXL refiner"),
    "playground": ({**SDXL_KEYS, "edm_mean": (1,), "edm_std": (1,)}, "Playground v2.5"),
    "cosxl": ({**SDXL_KEYS, "edm_vpred.sigma_max": ()}, "CosXL"),
    "sd3": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (1,)}, "Stable Diffusion 3"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (1,)}, "Flux"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (1,)}, "a LoRA"),
    "vae": ({"encoder.down.0.block.0.conv1.weight": (1,)}, "a VAE only"),
    "unet_only": ({UNET_IN: (1,)}, "a UNet without its text encoders"),
    "no_vae": ({UNET_IN: (1,), "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (1,)},
               "without its VAE"),
}


@pytest.mark.parametrize("kind", sorted(NOT_SUPPORTED))
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, kind):
    from longalign_core.errors import BadModelFileError
    from trainer.loading.single_file import load_single_file

    keys, looks_like = NOT_SUPPORTED[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(BadModelFileError) as err:
        load_single_file(path)
    message = str(err.value)
    assert str(path) in message and looks_like in message and "SD1.x and SDXL-family" in message, message
    assert "\n" not in message


def test_ckpt_is_read_without_running_its_pickle(tmp_path):
    from longalign_core.errors import BadModelFileError
    from trainer.loading.single_file import checkpoint_family, read_checkpoint_shapes

    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 3),
             **{k: torch.zeros(s) for k, s in VAE_KEYS.items()}}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, ckpt)  # the Lightning wrapper
    shapes = read_checkpoint_shapes(ckpt)
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert checkpoint_family(shapes, ckpt) == "sd1"

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(BadModelFileError, match=r"evil\.ckpt .*pickled Python objects"):
        read_checkpoint_shapes(evil)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model\n")
    with pytest.raises(BadModelFileError, match=r"notes\.safetensors is not a valid safetensors file"):
        read_checkpoint_shapes(text)


def test_trainer_cli_refuses_an_unsupported_checkpoint_in_one_paragraph(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A red fox. The sky is orange.\n")
    proc = run_module(["--model", str(path), "--output-dir", str(tmp_path / "run"), "--reward-model", "embedded",
                       "--prompts", str(prompts)], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if "error:" in ln][-1]
    assert str(path) in line and "Flux" in line and "SDXL-family" in line


# ------------------------------------------------------------------------------------------------------------
# The trainer reads the UNet ComfyUI reads (the stand-ins of the end-to-end workflow tests)


@requires_comfy
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_trainer_reads_the_unet_comfyui_reads(standin_checkpoints, family):
    """ComfyUI's own detection and loader on the workflow tests' stand-in checkpoints (SDXL: the published
    layout, bigG in open_clip layout) against :func:`load_single_file`: the same UNet layout, and every UNet
    weight equal through ComfyUI's own diffusers -> LDM name map."""
    import_comfy()
    import comfy.sd
    import comfy.utils

    from trainer.loading.checkpoint_configs import ldm_unet_config_from_shapes
    from trainer.loading.single_file import load_single_file, read_checkpoint_shapes

    path = standin_checkpoints.path(family)
    patcher = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    detected = dict(patcher.model.model_config.unet_config)
    ours = ldm_unet_config_from_shapes(read_checkpoint_shapes(path))
    assert {k: detected.get(k) for k in ours} == ours
    theirs = patcher.model.diffusion_model.state_dict()
    base = load_single_file(path)
    assert base.is_sdxl == (family == "sdxl")
    to_ldm = comfy.utils.unet_to_diffusers(detected)
    loaded = base.unet.state_dict()
    assert set(loaded) <= set(to_ldm), sorted(set(loaded) - set(to_ldm))[:5]
    assert {to_ldm[k] for k in loaded} == set(theirs)
    for key, value in loaded.items():
        torch.testing.assert_close(value.float(), theirs[to_ldm[key]].float(), msg=key)


def test_sdxl_fp16_file_in_a_bf16_run_is_cast_as_it_is_read(tmp_path, offline, monkeypatch):
    """SDXL base is published in fp16 and trained in bf16: the UNet and both text encoders are read through
    read_cast (one copy in memory; bench/load.py measures it) and hold exactly the stored values cast once."""
    from longalign_core import dtype_loading
    from trainer.loading.single_file import load_single_file

    path, unet, vae, clip_l, clip_g = build_tiny_sdxl(tmp_path)
    read = []
    real = dtype_loading.read_cast
    monkeypatch.setattr(dtype_loading, "read_cast", lambda p, dtype, names=None, *a: (
        read.append((dtype, sorted({n.split(".")[0] for n in names}))), real(p, dtype, names, *a))[1])
    base = load_single_file(path, torch.bfloat16)
    assert read == [(torch.bfloat16, ["model"]), (torch.bfloat16, ["conditioner"])]
    for ours, original in ((base.unet, unet), (base.text_encoder, clip_l), (base.text_encoder_2, clip_g)):
        got = ours.state_dict()
        for k, v in original.state_dict().items():  # fp16-exact originals: one rounding to bf16, bit for bit
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k
    got = base.vae.state_dict()
    for k, v in vae.state_dict().items():  # the VAE: read as stored (fp16), then cast
        assert torch.equal(got[k].reshape(v.shape), v.half().to(torch.bfloat16)), k
