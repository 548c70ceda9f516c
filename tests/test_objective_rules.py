"""The training objectives' small rules, each against its definition (issue 27 point 8): the align stage's loss
written out, the DDIM gradient offset's range, caption dropout's rate, one crop for every decode piece, when
``auto`` V switches to the per-step V, and the seeded sample of training prompts V is built from."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from trainer_support import FAST, align_batch, align_loss, one_thread  # noqa: F401  (one_thread: autouse fixture)

from trainer.config import TrainConfig
from trainer.finetune import Trainer

CAPTIONS = ["A cat sleeps on a red chair. The window is open.", "A lighthouse on a cliff. Waves crash below.",
            "A tram climbs a steep street. Washing hangs above."]


@pytest.fixture(scope="module")
def align_run(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    run = Trainer(TrainConfig.from_args(["--output-dir", str(folder / "run"), *FAST, "--stage", "align",
                                         "--prompts", str(folder), "--validation-prompts", "0", "--train-steps", "1",
                                         "--train-batch-size", "3", "--caption-dropout", "0"]))
    run.parts.lora.unet.eval()  # no LoRA dropout
    return run


def test_align_loss_is_the_noise_prediction_mse_with_the_vae_scaling_factor(align_run):
    """loss = mean ‖ε_θ(√ᾱ_t z + √(1−ᾱ_t) ε, t, c) − ε‖², z = scaling_factor · (μ + σ·n) the VAE posterior's
    sample of the image in [-1, 1]; the draws in the objective's order (dropout, posterior, ε, t)."""
    run = align_run
    images, captions, time_ids = align_batch(run, 0)
    loss, _ = align_loss(run, (images, captions, time_ids), torch.Generator().manual_seed(11))

    gen = torch.Generator().manual_seed(11)
    keep = torch.rand(len(captions), generator=gen) >= 0.0  # --caption-dropout 0 keeps every caption
    assert keep.all()
    vae, unet = run.parts.base.vae, run.parts.lora.module
    scaling = vae.config.scaling_factor
    assert scaling == pytest.approx(0.18215)
    with torch.no_grad():
        posterior = vae.encode(images * 2 - 1).latent_dist
        z = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)) * scaling
        eps = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (z.shape[0],), generator=gen)
        alpha_bar = run.parts.base.noise_scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * eps
        cond = run.parts.text.encode(captions, with_uncond=False).cond
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        expected = ((pred.float() - eps) ** 2).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)


def test_grad_offset_covers_every_step_of_its_range():
    from trainer.objective import draw_grad_offset

    draws = [draw_grad_offset(20, 5, torch.Generator().manual_seed(s)) for s in range(400)]
    counts = np.bincount(draws, minlength=4)
    assert len(counts) == 4 and counts.min() > 60  # uniform over 0..3 (every = 20 // 5 = 4): about 100 each


def test_caption_dropout_empties_the_stated_share():
    from trainer.objective import drop_captions

    captions = [f"caption {i}" for i in range(2000)]
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    empty = sum(c == "" for c in dropped)
    assert 146 <= empty <= 254  # 2000 × 0.1 ± 4 binomial standard deviations
    assert all(c in ("", o) for c, o in zip(dropped, captions))
    assert drop_captions(captions, 0.0, torch.Generator().manual_seed(0)) == captions


def test_every_decode_piece_takes_the_same_random_crop(tmp_path):
    """--reward-crop random: scoring in pieces of one image gives what scoring the batch whole gives."""
    from longalign_core.reference_direction import direction_from_prompts
    from trainer.objective import decode_and_score

    path = tmp_path / "p.txt"
    path.write_text("\n".join(CAPTIONS * 2) + "\n")
    run = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "run"), *FAST, "--prompts", str(path),
                                         "--validation-prompts", "0", "--train-steps", "1", "--train-batch-size",
                                         "3", "--reward-crop", "random", "--resolution", "64"]))
    v = direction_from_prompts(run.parts.scoring.judge, CAPTIONS)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    crops_seen = set()
    for crop_seed in range(6):
        vae, judge = run.parts.base.vae, run.parts.scoring.judge
        _, whole, _ = decode_and_score(dataclasses.replace(run.cfg, decode_batch=3), vae, judge,
                                       x0.clone().requires_grad_(), CAPTIONS, v, crop_seed)
        _, pieces, _ = decode_and_score(dataclasses.replace(run.cfg, decode_batch=1), vae, judge,
                                        x0.clone().requires_grad_(), CAPTIONS, v, crop_seed)
        torch.testing.assert_close(pieces.score, whole.score, atol=1e-6, rtol=1e-5)
        crops_seen.add(round(float(whole.score.sum()), 5))
    assert len(crops_seen) > 1  # the crop really moves with the seed


def test_auto_direction_switches_at_32_prompts_per_step():
    from trainer.direction import MIN_PROMPTS_FOR_BATCH_V, resolve_direction

    assert MIN_PROMPTS_FOR_BATCH_V == 32
    assert resolve_direction("auto", 32) == ("batch", None)
    assert resolve_direction("auto", 31)[0] == "training"


def test_direction_sample_is_a_seeded_uniform_sample():
    from trainer.direction import direction_sample

    prompts = [f"prompt {i}" for i in range(100)]
    samples = [direction_sample(prompts, 10, seed) for seed in range(300)]
    assert all(len(s) == 10 and s == [p for p in prompts if p in s] for s in samples)  # file order, no repeats
    assert samples[0] == direction_sample(prompts, 10, 0)  # seeded
    share = np.mean([[p in s for p in prompts] for s in samples], axis=0)  # how often each prompt is drawn
    assert share.min() > 0.02 and share.max() < 0.2  # every prompt about 10 % of the time
    assert direction_sample(prompts[:5], 10, 0) == prompts[:5]
