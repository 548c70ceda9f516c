"""The trainer at real size (issue #17): the published SD1.5 and SDXL-base architectures built on the meta device
(no memory) against numbers written out here, ComfyUI's key map at full size, models loaded in the training
dtype, ``--dry-run`` on the embedded models, and model paths that do not exist named before anything loads."""

from __future__ import annotations

import pytest
import torch

from comfy_support import import_comfy, requires_comfy
from longalign_core.lora import diffusers_config_from_ldm, load_unet_config, lora_targets
from trainer.config import TrainConfig
from trainer.finetune import Trainer, cli, main
from trainer_support import FAST, one_thread  # noqa: F401  (autouse fixture)

#: LoRA layers of the trainer on the published UNets, by kind. SD1.5: 16 transformer blocks × 9 projections
#: (attn1 and attn2 q/k/v/out, GEGLU) = 144; 22 resnets (8 down, 2 mid, 12 up) × conv1/time_emb_proj/conv2; 14
#: conv_shortcuts (2 down where the width grows, every one of the 12 up resnets, which take the skip). SDXL base:
#: 70 transformer blocks (2·2 + 2·10 down, 10 mid, 3·2 + 3·10 up) × 9 = 630; 17 resnets (6 down, 2 mid, 9 up) × 3;
#: 11 conv_shortcuts (2 down, 9 up).
LAYERS = {"sd15": {"transformer": 144, "conv1": 22, "time_emb_proj": 22, "conv2": 22, "conv_shortcut": 14},
          "sdxl": {"transformer": 630, "conv1": 17, "time_emb_proj": 17, "conv2": 17, "conv_shortcut": 11}}
#: Trainable parameters at rank 32: Σ 32·(in + out) over the layers (a conv's "in" is in·k·k).
LORA_PARAMS = {"sd15": 28_291_072, "sdxl": 82_749_440}
#: Parameters of the published UNets (SD1.5 860 M, SDXL base 2.6 B).
UNET_PARAMS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}


def meta_unet(family: str):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(load_unet_config(family))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_of_the_trainer_on_the_published_unet(family):
    from trainer.lora_layers import attach_lora

    unet = meta_unet(family)
    assert sum(p.numel() for p in unet.parameters()) == UNET_PARAMS[family]
    targets = lora_targets(unet)
    kinds: dict[str, int] = {}
    for t in targets:
        kind = "transformer" if ".transformer_blocks." in t.path else t.path.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == LAYERS[family] and len(targets) == sum(LAYERS[family].values())
    unet.requires_grad_(False)
    params = attach_lora(unet, targets, 32, torch.bfloat16)  # what Trainer runs, on meta tensors
    assert sum(p.numel() for p in params) == LORA_PARAMS[family]
    assert all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == UNET_PARAMS[family] and {p.dtype for p in frozen} == {torch.bfloat16}


def test_the_shipped_sdxl_config_is_sdxl_base():
    from test_sdxl_lora import SDXL_DIFFUSERS

    shipped = load_unet_config("sdxl")
    assert {k: shipped[k] for k in SDXL_DIFFUSERS} == SDXL_DIFFUSERS


@requires_comfy
def test_every_sd15_kohya_key_is_in_comfyui_key_map_at_full_size():
    import_comfy()
    import comfy.lora
    import comfy.supported_models

    ldm = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
               adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
               transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
               use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
               transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
               use_temporal_resblock=False)
    with torch.device("meta"):
        model = comfy.supported_models.SD15(ldm).get_model({})
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    targets = lora_targets(diffusers_config_from_ldm(model.model_config.unet_config))
    assert targets == lora_targets(meta_unet("sd15"))
    assert len(targets) == 224 and [t.kohya_name for t in targets if t.kohya_name not in key_map] == []


# ------------------------------------------------------------------------------------------------------------
# Loading in the training dtype


def test_base_model_loads_in_the_training_dtype_with_the_vae_rule(tmp_path):
    from trainer.loading.models import load_base_model

    sd = load_base_model("embedded", dtype=torch.bfloat16)
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    xl = load_base_model("embedded-sdxl", dtype=torch.float16)  # SDXL's VAE upcasts in fp16 runs
    assert {p.dtype for m in (xl.unet, xl.text_encoder, xl.text_encoder_2) for p in m.parameters()} == {torch.float16}
    assert {p.dtype for p in xl.vae.parameters()} == {torch.float32}
    fp32 = load_base_model("embedded-sdxl")
    for a, b in zip(fp32.unet.parameters(), xl.unet.parameters()):  # the same weights, rounded once
        torch.testing.assert_close(a.half(), b)


# ------------------------------------------------------------------------------------------------------------
# --dry-run


def test_dry_run_reports_memory_time_and_projection_and_writes_only_its_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--dry-run", "--output-dir", str(out), *FAST, "--train-steps", "40", "--validation-every", "10",
                 "--checkpoint-every", "20"]) == 0
    report = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["dry_run.md"]
    assert (out / "dry_run.md").read_text() in report
    from trainer.loading.embedded import embedded_pipeline_dir

    # the LoRA's size, counted here from the UNet's layer shapes: rank · (in (· k · k) + out) per layer
    targets = lora_targets(embedded_pipeline_dir() / "unet")
    rank = TrainConfig.from_args(FAST).lora_rank
    expected = sum(rank * (t.weight_shape[1] * (t.weight_shape[2] * t.weight_shape[3] if t.kind == "conv" else 1)
                           + t.weight_shape[0]) for t in targets)
    assert f"| LoRA, rank {rank} on {len(targets)} layers (trained) | {expected / 1e6:,.1f} M |" in report
    assert "**Peak memory of one step:" in report and "It fits" in report
    for phase in ("UNet, no gradients", "backward", "VAE decode", "reward", "optimizer"):
        assert phase in report, phase
    # 40 steps, validations at 0, 10, 20, 30 and the end; checkpoints at 20 (not at the last step)
    assert "+ 40 steps × " in report and "+ 5 validation(s) × " in report and "+ 1 checkpoint(s) × " in report


def test_dry_run_that_does_not_fit_names_the_setting_to_change_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def out_of_memory(self, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "optimizer_step", out_of_memory)
    out = tmp_path / "run"
    assert cli(["--dry-run", "--output-dir", str(out), *FAST, "--train-batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "the run does not fit" in err and "(1) lower --train-batch-size to 2 and raise " \
        "--gradient-accumulation-steps to 2" in err and "Traceback" not in err
    assert not out.exists()
    assert cli(["--dry-run", "--output-dir", str(out), *FAST, "--resolution", "100"]) == 2
    assert "--resolution must be a multiple of 8" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------------------------------
# Model paths that do not exist


@pytest.mark.parametrize("option,value", [("--model", "./models/sd15"), ("--reward-model", "models/denscore/x"),
                                          ("--t5-model", "~/no-such-t5"), ("--t5-adapter", "./adapter"),
                                          ("--init-lora", "./s28750_lora_vis.pt")])
def test_a_local_model_path_that_does_not_exist_is_named(tmp_path, capsys, option, value, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("A red fox.\n")
    args = ["--output-dir", str(tmp_path / "run"), "--prompts", str(prompts), *FAST]
    if option != "--reward-model":
        args += ["--reward-model", "embedded"]
    if option.startswith("--t5"):
        other = "--t5-adapter" if option == "--t5-model" else "--t5-model"
        args += [other, str(tmp_path)]
    if option != "--model":
        args += ["--model", "embedded"]
    assert cli([*args, option, value]) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "error:" in ln][-1]
    assert f"{option} {value}" in line and ("no such" in line or "not found" in line), line
    assert "Traceback" not in err and "connect" not in err.lower()
    assert not (tmp_path / "run").exists()
