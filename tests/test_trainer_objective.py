"""The trainer's objective, its LoRA dropout and its precision, checked against computations written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.config import TrainConfig
from trainer.finetune import Trainer
from trainer.seeding import step_generator
from trainer_support import FAST, one_thread, reward_loss  # noqa: F401  (one_thread: autouse fixture)

# Prompts of plain sentences: their segments are written out below, independently of the splitter.
PROMPTS = ["A red fox sits on a mossy rock. The sky is orange.",
           "A lighthouse stands on a cliff. Waves crash below. Gulls circle the tower."]
SEGMENTS = [["A red fox sits on a mossy rock.", "The sky is orange."],
            ["A lighthouse stands on a cliff.", "Waves crash below.", "Gulls circle the tower."]]
OMEGA = 0.3


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("objective")
    cfg = TrainConfig.from_args(["--output-dir", str(out), *FAST, "--reward-crop", "center", "--train-steps", "1",
                                 "--reward-omega", str(OMEGA), "--reward-direction", "batch"])
    t = Trainer(cfg)
    with torch.no_grad():  # a non-zero LoRA, so that gradients reach both of its factors
        g = torch.Generator().manual_seed(0)
        for p in t.parts.lora.params:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    t.parts.lora.unet.eval()  # no dropout: the recomputation below must see the same network
    return t


def clip_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Centre crop of 504/512 of the side, bilinear antialiased resize, CLIP normalisation (torchvision)."""
    from torchvision.transforms.v2 import functional as TF

    side = round(images.shape[-1] * 504 / 512)
    x = TF.center_crop(images, [side, side])
    x = TF.resize(x, [size, size], antialias=True)
    return TF.normalize(x, list(mean), list(std))


def tensor_of(out) -> torch.Tensor:
    """transformers 4 returns the projected features, 5 an output object with them as ``pooler_output``."""
    return out if torch.is_tensor(out) else out.pooler_output


def objective_from_definitions(trainer, images: torch.Tensor, omega: float) -> torch.Tensor:
    """0.5·(1 − mean_b(relevant_b + ω·irrelevant_b)) from the definitions (paper Eq. 6–7, docs/method.md §4–5):
    t_k = normalize(text_features(segment k)), t̄ = mean_k t_k, V = normalize(mean_b t̄_b) (the step's prompts),
    η = t̄·V, x̂ = normalize(image_features(x)), relevant = x̂·(t̄ − ηV), irrelevant = η·(x̂·V)."""
    from longalign_core.clip_vocab import load_clip_tokenizer

    reward = trainer.parts.scoring.judge
    clip = reward.model  # the transformers CLIPModel itself
    tok = load_clip_tokenizer()
    t_bar = []
    with torch.no_grad():
        for segs in SEGMENTS:
            ids = tok(segs, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            t_k = F.normalize(tensor_of(clip.get_text_features(input_ids=ids)).float(), dim=-1)
            t_bar.append(t_k.mean(0))
    t_bar = torch.stack(t_bar)
    v = t_bar.mean(0)
    v = v / v.norm()
    eta = t_bar @ v
    pixels = clip_preprocess(images, reward.image_size, reward.mean, reward.std)
    x_hat = F.normalize(tensor_of(clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
    relevant = (x_hat * (t_bar - eta[:, None] * v)).sum(-1)
    irrelevant = eta * (x_hat @ v)
    return 0.5 * (1 - (relevant + omega * irrelevant).mean())


def check_reward_loss_against_definitions(trainer, monkeypatch):
    """trainer.objective.reward_loss on PROMPTS (with the V the loop gives them): its loss and its gradient on every
    LoRA parameter equal the objective written out from the definitions on the images it generated; the plain
    score (ω = 1) is measurably different. Returns the statistics and the LoRA gradients of the loss."""
    import trainer.objective as objective

    captured = {}
    real_decode = objective.decode

    def spy(vae, latents):
        captured["images"] = real_decode(vae, latents)
        return captured["images"]

    monkeypatch.setattr(objective, "decode", spy)
    loss, stats = reward_loss(trainer, PROMPTS, step_generator(0, 0, 0))
    images = captured["images"]
    g_loss = torch.autograd.grad(loss, trainer.parts.lora.params, retain_graph=True)
    expected = objective_from_definitions(trainer, images, OMEGA)
    g_expected = torch.autograd.grad(expected, trainer.parts.lora.params, retain_graph=True)
    plain = objective_from_definitions(trainer, images, 1.0)
    g_plain = torch.autograd.grad(plain, trainer.parts.lora.params)

    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-6, rtol=1e-5)
    scale = float(flat(g_expected).abs().max())
    assert scale > 0
    torch.testing.assert_close(flat(g_loss), flat(g_expected), atol=1e-5 * scale, rtol=1e-4)
    # The same check cannot pass for the plain score: its loss and gradient differ far beyond the tolerance.
    assert abs(float(plain.detach() - expected.detach())) > 1e-3
    assert float((flat(g_plain) - flat(g_expected)).abs().max()) > 1e-2 * scale
    assert stats["reweighted"] == pytest.approx(1 - 2 * float(expected.detach()), abs=1e-6)
    return stats, g_loss


def test_reward_loss_is_the_reweighted_decomposed_objective(trainer, monkeypatch):
    check_reward_loss_against_definitions(trainer, monkeypatch)


def test_lora_dropout_drops_the_branch_output(trainer):
    """Training mode: each output element of a LoRA layer is the base output plus either 0 or the whole LoRA
    delta / (1 − p) — dropout on the branch's output (the release), not on its input (peft's placement)."""
    p = trainer.cfg.lora_dropout
    assert p == 0.1
    unet = trainer.parts.lora.module
    target = next(t for t in trainer.parts.lora.targets if t.path.endswith("attn1.to_q"))
    layer = dict(unet.named_modules())[target.path]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    x = torch.randn(2, 16, a.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
        delta = F.linear(F.linear(x, a), b) * scaling
        layer.eval()
        torch.testing.assert_close(layer(x) - base, delta, atol=1e-6, rtol=1e-5)
        layer.train()
        try:
            torch.manual_seed(0)
            diff = layer(x) - base
        finally:
            layer.eval()
    kept = torch.isclose(diff, delta / (1 - p), atol=1e-6, rtol=1e-4)
    dropped = diff.abs() < 1e-7
    assert bool((kept | dropped).all())
    assert 0.03 < float(dropped.float().mean()) < 0.2  # about p of the elements


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process: reset it around a bf16 trainer."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_precision_lora_fp32_frozen_parts_in_the_training_dtype(tmp_path, fresh_accelerate_state):
    from accelerate.state import AcceleratorState

    default = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "a"), *FAST, "--train-steps", "1"]))
    assert default.cfg.mixed_precision == "no"  # the CPU default
    AcceleratorState._reset_state(reset_partial_state=True)
    t = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "b"), *FAST, "--train-steps", "1",
                                       "--mixed-precision", "bf16"]))
    unet = t.parts.lora.module
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    frozen = {n: p for n, p in unet.named_parameters() if "lora_" not in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen.values())
    for module in (t.parts.base.vae, t.parts.base.text_encoder, t.parts.scoring.judge.model):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert all(s["exp_avg"].dtype == torch.float32 for s in t.parts.optimizer.state.values()) or not t.parts.optimizer.state
    t.train()  # one bf16 step on the CPU
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in t.parts.optimizer.optimizer.state.values())


def test_reference_settings_reproduce_the_released_conditioning_and_reward_segments(tmp_path, monkeypatch):
    """--split-mode reference --long-segments truncate (with the default --overflow truncate): the step's
    conditioning, positive and unconditional, is the released ``caption2embed`` (re-written in the tests), and
    the reward scores the released split's segments, each cut at 77 tokens."""
    import trainer.objective as objective
    from longalign_core.clip_vocab import load_clip_tokenizer
    from test_segment_encoding import reference_caption2embed
    from test_segmentation import reference_split
    from trainer_support import long_caption

    captions = [" ".join(["word"] * 90) + ". It costs 3.5 dollars? Mr. Smith agrees; ok",
                long_caption(300) + " Then 2.5 more."]
    t = Trainer(TrainConfig.from_args(["--output-dir", str(tmp_path / "run"), *FAST, "--train-steps", "1",
                                       "--split-mode", "reference", "--long-segments", "truncate"]))
    step = t.parts.text.encode(captions, True)
    tok = load_clip_tokenizer()
    torch.testing.assert_close(step.cond, reference_caption2embed(captions, tok, t.parts.base.text_encoder), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(step.uncond, reference_caption2embed(["", ""], tok, t.parts.base.text_encoder), atol=1e-5,
                               rtol=1e-5)
    assert step.prompts_cut == 2 and step.tokens_lost > 0

    seen = {}
    real = objective.segment_score

    def spy(*args, **kwargs):
        seen["result"] = real(*args, **kwargs)
        return seen["result"]

    monkeypatch.setattr(objective, "segment_score", spy)
    reward_loss(t, captions, step_generator(0, 0, 0))
    clip = t.parts.scoring.judge.model
    for caption, feats in zip(captions, seen["result"].prompts):
        segments = reference_split(caption)
        ids = tok(segments, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = F.normalize(tensor_of(clip.get_text_features(input_ids=ids)).float(), dim=-1)
        torch.testing.assert_close(feats.features, expected, atol=1e-5, rtol=1e-5)
