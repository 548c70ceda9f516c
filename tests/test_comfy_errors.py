"""Bad input at the nodes, in a real ComfyUI (in-process): each case gets one clear message that names the node,
the input and the fix, or a correct result — never a silent NaN. Skips unless COMFYUI_PATH is set."""

import math
import shutil
import sys

import pytest
import torch

from comfy_support import host_clip, import_comfy, load_pack, requires_comfy

pytestmark = requires_comfy


@pytest.fixture(scope="module")
def mods():
    pack = load_pack()
    return {name: sys.modules[f"{pack.__name__}.nodes.{name}"] for name in ("text_encode", "weights_nodes",
                                                                             "denscore_nodes")}


@pytest.fixture(scope="module")
def clip_l():
    return host_clip("l")


def encode(mods, clip, text, overflow="extend"):
    out = mods["text_encode"].LongAlignTextEncode.execute(clip=clip, text=text, token_budget=240, overflow=overflow,
                                                          split_mode="sentence", long_sentences="split")
    return out.args


@pytest.mark.parametrize("weight", ["nan", "1e309", "-inf", "500"])
def test_non_finite_or_absurd_prompt_weights_are_named(mods, clip_l, weight):
    with pytest.raises(ValueError, match=r"prompt weight .* in 'A red \(fox:" + weight.replace("+", "") +
                       r"\) sits\.'.*\(word:1\.2\)"):
        encode(mods, clip_l, f"A calm lake. A red (fox:{weight}) sits.")


def test_ordinary_weights_still_encode_finitely(mods, clip_l):
    (cond, _), = encode(mods, clip_l, "A calm lake. A red (fox:1.3) sits. (blurry:0.5)")[0]
    assert torch.isfinite(cond).all()


def test_over_budget_with_overflow_error_names_the_budget_and_the_fix(mods, clip_l):
    text = " ".join(f"Sentence {i} describes one more brass lantern by the door." for i in range(40))
    with pytest.raises(ValueError, match=r"token budget is 240.*'extend'"):
        encode(mods, clip_l, text, overflow="error")


def test_no_clip_connected(mods):
    with pytest.raises(ValueError, match="no CLIP connected"):
        encode(mods, None, "A cat.")


class _T5OnlyClip:
    """A text encoder whose tokenizer gives a T5 stream (SD3 / Flux style), not CLIP's l/g/h."""

    def tokenize(self, text):
        return {"t5xxl": [[(1, 1.0)] * 77]}


def test_a_text_encoder_that_is_not_clip_is_refused_in_the_error_family(mods):
    pack = load_pack()
    errors = sys.modules[f"{pack.__name__}.longalign_core.errors"]
    with pytest.raises(errors.UnsupportedClipError,
                       match=r"streams \['t5xxl'\]\. Use the model's own text-encode") as e:
        encode(mods, _T5OnlyClip(), "A cat.")
    assert isinstance(e.value, errors.LongAlignError) and isinstance(e.value, ValueError)
    clip_segments = sys.modules[f"{pack.__name__}.nodes.clip_segments"]
    assert clip_segments.UnsupportedClipError is errors.UnsupportedClipError  # what callers import still works


@pytest.fixture(scope="module")
def sd15(tmp_path_factory, standin_checkpoints):
    comfy = import_comfy()
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    (root / "loras").mkdir()
    folder_paths.folder_names_and_paths["loras"] = ([str(root / "loras")], {".pt", ".safetensors"})
    ckpt = standin_checkpoints.place("sd15", root / "tiny_sd15.safetensors")
    model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    return model, root


def test_nan_lora_strength_is_refused_before_patching(mods, sd15):
    model, root = sd15
    node = mods["weights_nodes"].LongAlignLoadLongSDLoRA
    with pytest.raises(ValueError, match=r"strength nan is not a number; use a value like 1\.0"):
        node.execute(model, "anything.safetensors", math.nan)
    assert model.patches == {}


def test_missing_lora_file_is_named_at_queue_time(mods, sd15):
    node = mods["weights_nodes"].LongAlignLoadLongSDLoRA
    message = node.validate_inputs("sd15-reward-3750.pt")
    assert isinstance(message, str)
    assert "Load LongSD LoRA" in message and "sd15-reward-3750.pt" in message and "loras" in message


def test_corrupt_lora_file_names_the_file(mods, sd15):
    model, root = sd15
    (root / "loras" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="broken.safetensors"):
        mods["weights_nodes"].LongAlignLoadLongSDLoRA.execute(model, "broken.safetensors", 1.0)
    assert model.patches == {}


@pytest.fixture(scope="module")
def denscore(mods, tmp_path_factory, tiny_clip_dir):
    import folder_paths

    models = tmp_path_factory.mktemp("denscore_models")
    shutil.copytree(tiny_clip_dir, models / "denscore" / "tiny")
    folder_paths.folder_names_and_paths["denscore"] = ([str(models / "denscore")], {".safetensors", ".pt"})
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("temp")))
    mod = mods["denscore_nodes"]
    return mod, mod.LongAlignPreferenceModelLoader.execute("tiny", "auto", "fp32").args[0]


def test_upscaler_overshoot_is_scored_as_the_clipped_image(denscore):
    """Bicubic upscalers overshoot [0, 1] a little; the image a user saves is the clipped one, so score that."""
    mod, bundle = denscore
    images = torch.rand(2, 40, 48, 3, generator=torch.Generator().manual_seed(1))
    overshoot = images * 1.3 - 0.15  # up to 0.15 outside [0, 1] on both sides
    prompt = "A red fox sits on a rock. The sky is orange."
    got = mod.LongAlignDenscoreScore.execute(bundle, overshoot, prompt, 0.3, "", "sentence").args[0]
    want = mod.LongAlignDenscoreScore.execute(bundle, overshoot.clamp(0, 1), prompt, 0.3, "", "sentence").args[0]
    assert all(math.isfinite(v) for v in got)
    assert got == pytest.approx(want, abs=1e-6)


def test_empty_image_batch_is_named(denscore):
    mod, bundle = denscore
    with pytest.raises(ValueError, match="no images to score"):
        mod.LongAlignDenscoreScore.execute(bundle, torch.zeros(0, 8, 8, 3), "A cat.", 0.3, "", "sentence")


def test_missing_preference_model_is_named_at_queue_time(denscore):
    mod, _ = denscore
    message = mod.LongAlignPreferenceModelLoader.validate_inputs("Denscore")
    assert isinstance(message, str) and "denscore" in message and "Denscore" in message
