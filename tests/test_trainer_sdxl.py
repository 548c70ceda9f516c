"""The trainer on SDXL (``--model embedded-sdxl``: a tiny SDXL-architecture diffusers folder with random weights),
checked against diffusers' own ``StableDiffusionXLPipeline``, the objective written out from its definitions,
and token counts made with the tokenizer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.finetune import Trainer
from trainer.sampling import ddim_scheduler, decode, sample_truncated, vae_dtype
from trainer_support import FAST, align_batch, align_loss, long_caption, merged_tokens, one_thread, reward_loss, run_module  # noqa: F401

import test_trainer_objective as objective

SDXL = ["--model", "embedded-sdxl"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl")
    t = Trainer(TrainConfig.from_args([*SDXL, "--output-dir", str(out), *FAST, "--reward-crop", "center",
                                       "--train-steps", "1", "--reward-omega", str(objective.OMEGA),
                                       "--reward-direction", "batch"]))
    with torch.no_grad():  # a non-zero LoRA, so that gradients reach both of its factors
        g = torch.Generator().manual_seed(0)
        for p in t.parts.lora.params:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    t.parts.lora.unet.eval()
    return t


def test_embedded_sdxl_is_an_sdxl_pipeline(trainer):
    unet = trainer.parts.lora.module
    assert trainer.parts.base.is_sdxl and unet.config.addition_embed_type == "text_time"
    # SDXL's extra conditioning: the 1280-d pooled bigG vector and six 256-channel size/crop embeddings
    assert unet.add_embedding.linear_1.in_features == 1280 + 6 * 256 == 2816
    assert trainer.parts.base.text_encoder_2.config.projection_dim == 1280
    assert trainer.parts.base.vae.config.scaling_factor == 0.13025 and trainer.parts.base.vae.config.force_upcast
    assert trainer.cfg.resolution == 32  # FAST's; without it the model's own (below)
    assert any(".attn2.to_k" in t.path for t in trainer.parts.lora.targets) and any("ff.net.0.proj" in t.path
                                                                           for t in trainer.parts.lora.targets)


def test_sampling_equals_diffusers_sdxl_pipeline(trainer):
    """The trainer's CFG sampling (conditioning rows, pooled vectors, time ids, DDIM trailing) gives the same x̂0
    as diffusers' StableDiffusionXLPipeline run on the same UNet with the trainer's text embeddings: the pipeline
    builds its own ``add_time_ids`` and batches the pooled vectors itself."""
    from diffusers import StableDiffusionXLPipeline

    prompts = objective.PROMPTS
    unet = trainer.parts.lora.module
    step = trainer.parts.text.encode(prompts, True)
    cond, uncond = trainer.parts.text.unet_conditioning(step)
    steps, res = 4, trainer.cfg.resolution
    noise = torch.randn(len(prompts), 4, res // 8, res // 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = sample_truncated(trainer.parts.lora.eps, ddim_scheduler(trainer.parts.base.noise_scheduler, steps), noise, cond, uncond,
                                7.5, [])

    pipe = StableDiffusionXLPipeline(vae=trainer.parts.base.vae, text_encoder=trainer.parts.base.text_encoder,
                                     text_encoder_2=trainer.parts.base.text_encoder_2, tokenizer=trainer.parts.text.encoder.encoders[0].tokenizer,
                                     tokenizer_2=trainer.parts.text.encoder.encoders[1].tokenizer, unet=unet,
                                     scheduler=ddim_scheduler(trainer.parts.base.noise_scheduler, steps))
    pipe.set_progress_bar_config(disable=True)
    recorded = []
    real_step = pipe.scheduler.step

    def record(*args, **kwargs):
        out = real_step(*args, **kwargs)
        recorded.append(out[1] if isinstance(out, tuple) else out.pred_original_sample)
        return out

    pipe.scheduler.step = record
    pipe(prompt_embeds=step.cond, negative_prompt_embeds=step.uncond, pooled_prompt_embeds=step.pooled,
         negative_pooled_prompt_embeds=step.uncond_pooled, latents=noise.clone(), num_inference_steps=steps,
         guidance_scale=7.5, height=res, width=res, output_type="latent")
    assert len(recorded) == steps
    torch.testing.assert_close(ours, recorded[-1], atol=1e-5, rtol=1e-4)
    # the extra conditioning matters: without the pooled vectors' CFG split the result differs
    swapped = type(cond)(cond.context, uncond.text_embeds, cond.time_ids)
    with torch.no_grad():
        other = sample_truncated(trainer.parts.lora.eps, ddim_scheduler(trainer.parts.base.noise_scheduler, steps), noise, swapped,
                                 uncond, 7.5, [])
    assert (other - ours).abs().max() > 1e-3


def test_sdxl_reward_loss_is_the_reweighted_decomposed_objective(trainer, monkeypatch):
    """The objective on SDXL: loss and LoRA gradient equal 0.5·(1 − mean(relevant + ω·irrelevant)) written out
    from the definitions (test_trainer_objective) on the images the SDXL model generated."""
    stats, g_loss = objective.check_reward_loss_against_definitions(trainer, monkeypatch)
    # every LoRA layer of the SDXL UNet gets a gradient (cross-attention, GEGLU and ResNet layers alike)
    names = [n for n, p in trainer.parts.lora.module.named_parameters() if p.requires_grad]
    zero = [n for n, g in zip(names, g_loss) if "lora_B" in n and float(g.abs().max()) == 0]
    assert not zero, zero[:5]
    assert stats["cond_length"] == 240


@pytest.mark.parametrize("overflow", ["truncate", "extend"])
def test_sdxl_long_captions(trainer, overflow):
    """~300- and ~700-token captions: the prompts and the empty CFG prompt share one length on both encoders
    (2048 = 768 + 1280 channels in SDXL; 32 + 32 here); truncate reports every lost token (counted here with the
    tokenizer); the pooled vectors are bigG's (1280)."""
    captions = [long_caption(300), long_caption(700, offset=1)]
    m300, m700 = (merged_tokens(c) for c in captions)
    assert 300 <= m300 < 480 and 700 <= m700 < 720
    trainer.cfg.overflow = overflow
    try:
        step = trainer.parts.text.encode(captions, True)
    finally:
        trainer.cfg.overflow = "truncate"
    length = 720 if overflow == "extend" else 240
    assert step.cond.shape == step.uncond.shape == (2, length, 64)
    assert step.pooled.shape == step.uncond_pooled.shape == (2, 1280)
    if overflow == "extend":
        assert step.tokens_lost == 0 and step.prompts_cut == 0
    else:
        assert step.prompts_cut == 2 and step.tokens_lost == (m300 - 240) + (m700 - 240)


def test_vae_is_upcast_for_fp16_and_decodes_in_fp32_under_autocast(trainer):
    """The rule is the VAE config's own ``force_upcast`` (diffusers' flag): fp32 in an fp16 run for SDXL's VAE and
    for SD1.5's (its published config leaves the flag at diffusers' default, True), the training dtype under bf16
    and for a VAE made for fp16 (madebyollin/sdxl-vae-fp16-fix says force_upcast false). Under autocast the
    upcast VAE still decodes in fp32: the same pixels as without autocast."""
    from diffusers import AutoencoderKL

    from trainer.loading.checkpoint_configs import sd15_config_dir

    sd15_vae = AutoencoderKL.load_config(sd15_config_dir(), subfolder="vae")
    assert "force_upcast" not in sd15_vae  # as in runwayml/stable-diffusion-v1-5 vae/config.json
    assert AutoencoderKL.from_config(sd15_vae).config.force_upcast is True
    assert vae_dtype(torch.float16, AutoencoderKL.from_config(sd15_vae).config) == torch.float32
    assert vae_dtype(torch.float16, trainer.parts.base.vae.config) == torch.float32
    assert vae_dtype(torch.bfloat16, trainer.parts.base.vae.config) == torch.bfloat16
    assert vae_dtype(torch.float16, {"force_upcast": False}) == torch.float16
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = decode(trainer.parts.base.vae, latents)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = decode(trainer.parts.base.vae, latents)
    assert trainer.parts.base.vae.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, atol=0, rtol=0)


def test_resolution_defaults_to_the_models_own(tmp_path):
    t = Trainer(TrainConfig.from_args([*SDXL, "--output-dir", str(tmp_path), "--train-steps", "1",
                                       "--validation-prompts", "0"]))
    unet = t.parts.lora.module
    assert t.cfg.resolution == unet.config.sample_size * 8 == 64
    import json

    assert json.loads((tmp_path / "config.json").read_text())["resolution"] == 64


def test_align_stage_time_ids_describe_the_crop(tmp_path):
    """Align stage on SDXL: each image's time ids are (original h, w, crop top, left, target h, w) of the crop
    that was really taken, and training runs."""
    import datasets
    import numpy as np
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(pixels)] * 2, "caption": ["A cat. A dog."] * 2},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "pairs"))
    t = Trainer(TrainConfig.from_args([*SDXL, "--output-dir", str(tmp_path / "run"), *FAST, "--stage", "align",
                                       "--prompts", str(tmp_path / "pairs"), "--train-steps", "2",
                                       "--validation-prompts", "0"]))
    images, captions, time_ids = align_batch(t, 0)
    # 80x72 resized to a short side of 32 is 35x32 (torchvision: int(32 * 80 / 72)); centre crop from row
    # round(3 / 2) = 2, column 0
    assert time_ids.tolist() == [[80, 72, 2, 0, 32, 32]] * 2
    resized = TF.resize(TF.to_dtype(TF.to_image(pixels), torch.float32, scale=True), 32, antialias=True)
    assert resized.shape[-2:] == (35, 32)
    torch.testing.assert_close(images[0], resized[:, 2:34, :])
    lora = t.train()
    assert len(load_file(str(lora))) == 3 * len(t.parts.lora.targets)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    """A run stopped during step 3 (after the step-2 checkpoint) and resumed with ``--resume latest`` ends with the
    same LoRA as a run that was never stopped."""
    args = [*SDXL, *FAST, "--train-steps", "4", "--checkpoint-every", "2", "--seed", "3"]
    straight = Trainer(TrainConfig.from_args([*args, "--output-dir", str(tmp_path / "a")])).train()

    stopped = Trainer(TrainConfig.from_args([*args, "--output-dir", str(tmp_path / "b")]))
    real_step = stopped.optimizer_step

    def stop_at_3(step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(step)

    monkeypatch.setattr(stopped, "optimizer_step", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    assert not (tmp_path / "b" / "longalign_lora.safetensors").exists()
    resumed = Trainer(TrainConfig.from_args([*args, "--output-dir", str(tmp_path / "b"), "--resume", "latest"])).train()
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and len(a) == 3 * len(stopped.parts.lora.targets)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-4, msg=k)


def test_t5_branch_is_refused_on_sdxl(tmp_path, tiny_t5_dir, tiny_adapter_dir):
    from longalign_core.errors import BadConfigError

    with pytest.raises(BadConfigError, match="SDXL model"):
        Trainer(TrainConfig.from_args([*SDXL, "--output-dir", str(tmp_path), *FAST, "--t5-model", str(tiny_t5_dir),
                                       "--t5-adapter", str(tiny_adapter_dir)]))


def test_two_processes_on_sdxl(tmp_path):
    """torchrun, 2 CPU processes: captions of ~300 and ~700 tokens on the two ranks, overflow extend; both ranks
    end with the same LoRA and V is the normalised mean of both ranks' prompt embeddings."""
    prompts = tmp_path / "train.txt"
    prompts.write_text(long_caption(300) + "\n" + long_caption(700, offset=1) + "\n")
    out = tmp_path / "ddp"
    proc = run_module([*SDXL, "--output-dir", str(out), *FAST, "--sample-steps", "2", "--sample-grad-steps", "1",
                       "--train-steps", "1", "--dump-debug", "--train-batch-size", "1", "--prompts", str(prompts),
                       "--validation-prompts", "0", "--overflow", "extend", "--reward-direction", "batch"], nproc=2,
                      port=29541)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "processes = 2" in proc.stdout and "(SDXL, epsilon)" in proc.stdout
    r0 = torch.load(out / "debug" / "rank0-step000000.pt", weights_only=True)
    r1 = torch.load(out / "debug" / "rank1-step000000.pt", weights_only=True)
    assert r0["lora_checksum"] == pytest.approx(r1["lora_checksum"], rel=1e-9)
    assert {r0["cond_length"], r1["cond_length"]} == {480, 720}
    assert r0["cond_length"] == r0["uncond_length"] and r1["cond_length"] == r1["uncond_length"]
    gathered = torch.nn.functional.normalize((r0["t_bar_mean"] + r1["t_bar_mean"]) / 2, dim=0)
    torch.testing.assert_close(r0["direction"], gathered, atol=1e-6, rtol=1e-5)
    assert (out / "longalign_lora.safetensors").is_file()


def test_v_prediction_models_get_their_own_target_and_x0(trainer, monkeypatch):
    """A v-prediction model (the single-file loader reads NoobAI-XL V-Pred's ``v_pred`` marker into the scheduler
    config): the align stage regresses v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0, and the reward stage's DDIM step takes
    x̂0 = sqrt(ᾱ_t)·x_t − sqrt(1 − ᾱ_t)·v — both written out here from ᾱ."""
    from diffusers import DDPMScheduler

    vpred = DDPMScheduler.from_config(trainer.parts.base.noise_scheduler.config, prediction_type="v_prediction")
    abar = vpred.alphas_cumprod
    # DDIM step with a v output
    scheduler = ddim_scheduler(vpred, 4)
    t = scheduler.timesteps[1]
    x_t, v = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    x0 = scheduler.step(v, t, x_t).pred_original_sample
    torch.testing.assert_close(x0, abar[t].sqrt() * x_t - (1 - abar[t]).sqrt() * v)

    # align target
    monkeypatch.setattr(trainer.parts.base, "noise_scheduler", vpred)  # its prediction_type follows
    assert trainer.parts.base.prediction_type == "v_prediction"
    seen = {}
    real_add_noise, real_eps = vpred.add_noise, trainer.parts.lora.eps
    monkeypatch.setattr(vpred, "add_noise", lambda x, n, ts: seen.update(x0=x, noise=n, t=ts) or real_add_noise(x, n, ts))
    monkeypatch.setattr(trainer.parts.lora, "eps", lambda *a: seen.setdefault("pred", real_eps(*a)))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    with torch.no_grad():
        loss, _ = align_loss(trainer, (images, ["A cat.", "A dog."], time_ids), torch.Generator().manual_seed(3))
    a = abar[seen["t"]].view(-1, 1, 1, 1)
    v_target = a.sqrt() * seen["noise"] - (1 - a).sqrt() * seen["x0"]
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(seen["pred"].float(), v_target.float()))
    assert float((v_target - seen["noise"]).abs().max()) > 1e-2  # ε would be a different target


def test_reward_stage_on_a_v_prediction_model_decodes_x0_from_v(trainer, monkeypatch):
    """The reward stage on a v-prediction model: the x̂0 it decodes is sqrt(ᾱ_t)·x_t − sqrt(1 − ᾱ_t)·v of the
    last DDIM step, v the guided prediction v_u + g·(v_c − v_u) — written out here from ᾱ and the UNet's
    outputs (an ε reading would give (x_t − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t) instead)."""
    from diffusers import DDPMScheduler

    import trainer.objective as objective

    vpred = DDPMScheduler.from_config(trainer.parts.base.noise_scheduler.config, prediction_type="v_prediction")
    monkeypatch.setattr(trainer.parts.base, "noise_scheduler", vpred)
    calls, decoded = [], []
    real_eps, real_decode = trainer.parts.lora.eps, objective.decode
    monkeypatch.setattr(trainer.parts.lora, "eps", lambda x, t, c: calls.append((x, t, real_eps(x, t, c))) or calls[-1][2])
    monkeypatch.setattr(objective, "decode", lambda vae, x: decoded.append(x) or real_decode(vae, x))
    from trainer.seeding import step_generator

    with torch.no_grad():
        reward_loss(trainer, ["A cat. A dog."], step_generator(0, 0, 0))
    x_in, t, out = calls[-1]
    x_t = x_in.chunk(2)[0]
    v_u, v_c = out.chunk(2)
    v = v_u + trainer.cfg.sample_guidance * (v_c - v_u)
    abar = vpred.alphas_cumprod[int(t[0])]
    torch.testing.assert_close(decoded[0], abar.sqrt() * x_t - (1 - abar).sqrt() * v, atol=1e-5, rtol=1e-4)
    as_eps = (x_t - (1 - abar).sqrt() * v) / abar.sqrt()
    assert float((decoded[0] - as_eps).abs().max()) > 1e-3
