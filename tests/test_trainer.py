"""`python -m trainer.finetune` on the built-in tiny pipeline (CPU)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO
from longalign_core.lora import load_lora, lora_targets
from trainer.config import TrainConfig
from longalign_core.errors import BadConfigError
from trainer.checkpoints import checkpoints
from trainer.finetune import Trainer, cli, main
from trainer.loading.embedded import embedded_pipeline_dir
from trainer.loading.models import load_base_model
from trainer.sampling import ddim_scheduler, grad_step_indices, sample_truncated
from trainer_support import FAST, one_thread  # noqa: F401  (autouse fixture)


def cfg(tmp_path, *extra):
    return TrainConfig.from_args(["--output-dir", str(tmp_path / "run"), *FAST, *extra])


def test_help_and_config_validation(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--reward-omega" in out and "accelerate launch" in out and "(default: 0.3)" in out
    with pytest.raises(BadConfigError, match="multiple of --sample-grad-steps"):
        TrainConfig(sample_steps=50, sample_grad_steps=7)
    with pytest.raises(BadConfigError, match="--reward-omega must be in"):
        TrainConfig(reward_omega=2.0)
    toml = tmp_path / "run.toml"
    toml.write_text('train_steps = 7\nreward_omega = 0.5\nlearning_rate = 1e-4\n')
    c = TrainConfig.from_args(["--config", str(toml), "--train-steps", "9"])
    assert (c.train_steps, c.reward_omega, c.learning_rate) == (9, 0.5, 1e-4)
    toml.write_text('train_stepz = 7\n')
    with pytest.raises(BadConfigError, match="unknown option 'train_stepz'; did you mean 'train_steps'"):
        TrainConfig.from_args(["--config", str(toml)])
    with pytest.raises(BadConfigError, match="--sample-grad-steps must be in 1"):
        main(["--sample-grad-steps", "0"])
    assert cli(["--sample-grad-steps", "0"]) == 2


def test_paper_defaults():
    # The paper's and the release's numbers (../shared/SPEC.md §1 and §5; LoRA dropout 0.1 is the released
    # code's), written out here: a changed default fails.
    paper = dict(learning_rate=3e-5, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8,
                 lr_warmup_steps=2000, max_grad_norm=0.3, train_batch_size=8, lora_rank=32, reward_omega=0.3,
                 sample_steps=50, sample_grad_steps=5, sample_guidance=7.5, token_budget=240, lora_dropout=0.1,
                 caption_dropout=0.1, train_steps=3750)
    c = TrainConfig()
    assert {k: getattr(c, k) for k in paper} == paper
    assert [int(t) for t in ddim_scheduler(load_base_model(None).noise_scheduler, 50).timesteps][:3] == [999, 979, 959]
    assert grad_step_indices(50, 5, 3) == [3, 13, 23, 33, 43]


def test_gradients_come_only_from_the_chosen_steps():
    base = load_base_model(None)
    unet = base.unet.float()
    unet.requires_grad_(False)
    param = unet.conv_out.weight
    param.requires_grad_(True)
    scheduler = ddim_scheduler(base.noise_scheduler, 10)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    eps = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731

    def grad(indices):
        seen = []
        x0 = sample_truncated(eps, scheduler, noise, cond, uncond, 7.5, indices,
                              on_step=lambda i, with_grad: seen.append((i, with_grad)))
        assert [i for i, w in seen if w] == indices
        if not indices:
            assert not x0.requires_grad
            return torch.zeros_like(param)
        return torch.autograd.grad(x0.square().mean(), param)[0]

    both = grad([1, 6])
    assert both.abs().sum() > 0
    torch.testing.assert_close(both, grad([1]) + grad([6]), atol=1e-7, rtol=1e-4)
    assert torch.equal(grad([]), torch.zeros_like(param))


def test_one_reward_step_changes_only_lora_weights(tmp_path):
    trainer = Trainer(cfg(tmp_path, "--train-steps", "1"))
    unet = trainer.parts.lora.module
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainer.train()
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed and changed <= lora
    assert any("lora_B" in n for n in changed)


def test_output_lora_metadata_and_loader(tmp_path):
    lora_file = Trainer(cfg(tmp_path, "--train-steps", "2")).train()
    with safe_open(str(lora_file), "pt") as f:
        meta = f.metadata()
    assert meta["stage"] == "reward" and meta["rank"] == "4" and meta["omega"] == "0.3" and meta["steps"] == "2"
    assert (meta["overflow"], meta["token_budget"], meta["lora_dropout"]) == ("truncate", "240", "0.1")
    assert len(meta["prompts_sha256"]) == 16 and meta["base_model"].endswith("tiny-sd-v1-seed0")
    targets = lora_targets(embedded_pipeline_dir() / "unet")
    pairs = load_lora(lora_file, targets)
    assert len(pairs) == len(targets)
    assert all(k.startswith("lora_unet_") for k in load_file(str(lora_file)))
    out = tmp_path / "run"
    for name in ("config.json", "train_log.csv", "validation.csv", "report.png", "report.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["train_steps"] == 2


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(cfg(tmp_path, "--train-steps", "5", "--checkpoint-every", "2"))
    calls = {"n": 0}
    original = trainer.acc.save_state

    def failing(path):
        calls["n"] += 1
        original(path)
        if calls["n"] == 2:  # the second save dies after writing part of its files
            raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(trainer.acc, "save_state", failing)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    found = checkpoints(tmp_path / "run")
    assert [p.name for p in found] == ["checkpoint-000002"]
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-000004.tmp").exists()  # removed on the way out
    resumed = Trainer(cfg(tmp_path, "--train-steps", "5", "--checkpoint-every", "2", "--resume", "latest"))
    assert resumed.load_checkpoint("latest") == 2


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch, capsys):
    from trainer import objective

    monkeypatch.setattr(objective, "reward_loss", lambda *args, **kwargs: (
        torch.tensor(float("nan"), requires_grad=True), {}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["--output-dir", str(tmp_path / "run"), *FAST, "--train-steps", "3"]) == 3
    assert "the loss became nan at step 0" in capsys.readouterr().err


def run_cli(tmp_path, name, *extra, env_extra=None, wait=True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "trainer.finetune", "--output-dir", str(tmp_path / name), *FAST, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        proc.output = out
    return proc


def test_kill_then_resume_equals_uninterrupted(tmp_path):
    args = ["--train-steps", "8", "--checkpoint-every", "2", "--checkpoints-keep", "10", "--seed", "3"]
    run_cli(tmp_path, "straight", *args)
    proc = run_cli(tmp_path, "killed", *args, wait=False)
    deadline = time.time() + 300
    while not checkpoints(tmp_path / "killed") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "longalign_lora.safetensors").exists(), "finished before the kill"
    assert checkpoints(tmp_path / "killed")
    run_cli(tmp_path, "killed", *args, "--resume", "latest")
    a = load_file(str(tmp_path / "straight" / "longalign_lora.safetensors"))
    b = load_file(str(tmp_path / "killed" / "longalign_lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-4, msg=k)
    # The logs continue where the checkpoint stopped: every step once, the same values as the straight run.
    logs = {name: list(csv.DictReader((tmp_path / name / "train_log.csv").open())) for name in ("straight", "killed")}
    assert [int(r["step"]) for r in logs["killed"]] == list(range(1, 9))
    for x, y in zip(logs["straight"], logs["killed"]):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-4, abs=1e-6)
    vals = {name: list(csv.DictReader((tmp_path / name / "validation.csv").open())) for name in ("straight", "killed")}
    assert [r["step"] for r in vals["killed"]] == [r["step"] for r in vals["straight"]] == ["0", "8"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("straight", "killed"):
        events = EventAccumulator(str(tmp_path / name / "logs" / "longalign"))
        events.Reload()
        assert [e.step for e in events.Scalars("loss")] == list(range(1, 9)), name


def test_align_stage_trains_on_image_caption_pairs(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)) for _ in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "caption": ["A cat. A dog.", "Red sky. Blue sea.", "A tree."]},
                                    features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "pairs"))
    lora = Trainer(cfg(tmp_path, "--stage", "align", "--prompts", str(tmp_path / "pairs"), "--train-steps", "2")).train()
    assert lora.is_file()
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert len(log) == 3 and float(log[-1].split(",")[1]) > 0


def test_embedded_default_main_job(tmp_path):
    """The README's first command, shortened: no model arguments, built-in everything."""
    proc = run_cli(tmp_path, "demo", "--train-steps", "4")
    assert "No --model given" in proc.output and "Running training" in proc.output
    for name in ("longalign_lora.safetensors", "report.png", "report.md", "train_log.csv"):
        assert (tmp_path / "demo" / name).is_file(), name


def test_align_stage_trains_the_t5_adapter(tmp_path, tiny_t5_dir, tiny_adapter_dir):
    import datasets
    import numpy as np
    from PIL import Image

    from longalign_core.t5_branch import load_text_adapter

    rng = np.random.default_rng(1)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)],
         "caption": ["a red fox sits on a mossy rock.", "the sky is orange."]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "pairs"))
    with pytest.raises(ValueError, match="--train-t5-adapter needs --stage align"):
        cfg(tmp_path, "--train-t5-adapter", "--t5-model", str(tiny_t5_dir), "--t5-adapter", str(tiny_adapter_dir))
    trainer = Trainer(cfg(tmp_path, "--stage", "align", "--prompts", str(tmp_path / "pairs"), "--train-steps", "2",
                          "--t5-model", str(tiny_t5_dir), "--t5-adapter", str(tiny_adapter_dir),
                          "--train-t5-adapter", "--caption-dropout", "0"))
    assert trainer.parts.text.encode(["a red fox."], with_uncond=False).cond.shape == (1, 480, 32)
    trainer.train()
    before = load_text_adapter(tiny_adapter_dir).state_dict()
    after = load_text_adapter(tmp_path / "run" / "t5_adapter").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_judge_given_from_python_is_the_one_trained_against(tmp_path):
    """``Trainer(cfg, judge=…)`` trains against that preference model (issue 29.1): the built-in judge's weights
    given in memory train the LoRA that the same weights given as --reward-model train, bit for bit, and the
    judge's name is recorded; another judge trains another LoRA."""
    from transformers import CLIPModel

    from longalign_core.clip_vocab import load_clip_tokenizer
    from longalign_core.preference import wrap_hf_clip
    from trainer.loading.embedded import embedded_reward_dir

    folder = embedded_reward_dir(0)
    judge = wrap_hf_clip(CLIPModel.from_pretrained(folder), load_clip_tokenizer(), name="my judge")
    given = Trainer(cfg(tmp_path / "given", "--train-steps", "1", "--reward-model", "my judge"), judge=judge).train()
    loaded = Trainer(cfg(tmp_path / "loaded", "--train-steps", "1", "--reward-model", str(folder))).train()
    a, b = load_file(str(given)), load_file(str(loaded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(given), "pt") as f:
        assert f.metadata()["reward_model"] == "my judge"
    torch.manual_seed(5)
    other = wrap_hf_clip(CLIPModel(CLIPModel.from_pretrained(folder).config), load_clip_tokenizer(), name="other")
    c = load_file(str(Trainer(cfg(tmp_path / "other", "--train-steps", "1"), judge=other).train()))
    assert any(not torch.equal(a[k], c[k]) for k in a)
