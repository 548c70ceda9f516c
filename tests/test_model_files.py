"""Missing model files: one message naming the node, the option, the folder searched and where the released file
comes from — returned by the loaders' validate_inputs, so ComfyUI shows it when the prompt is queued."""

import sys

import pytest

from comfy_support import load_pack, requires_comfy
from longalign_core.model_files import SOURCES, missing_model_message


def test_listed_value_passes():
    assert missing_model_message("Load LongSD LoRA", "lora_name", "a.pt", "loras", ["a.pt", "b.pt"]) is True


@pytest.mark.parametrize("available", [[], [f"lora{i}.safetensors" for i in range(8)]])
def test_missing_value_names_node_option_folder_and_source(available):
    msg = missing_model_message("Load LongSD LoRA", "lora_name", "s28750_lora_vis.pt", "loras", available)
    assert isinstance(msg, str)
    for part in ("Load LongSD LoRA", "lora_name", "'s28750_lora_vis.pt'", "ComfyUI/models/loras/",
                 "huggingface.co/luping-liu/LongSD", "press R"):
        assert part in msg, part
    assert ("empty" in msg) == (not available)
    if available:  # a few of the files that are there, not a list of hundreds
        assert "lora0.safetensors" in msg and "lora7.safetensors" not in msg and "…" in msg


def test_every_loader_folder_has_a_source():
    assert set(SOURCES) == {"loras", "text_encoders", "longalign", "denscore"}


@requires_comfy
def test_loaders_refuse_a_missing_file_at_validation(tmp_path):
    """The nodes in a real ComfyUI: a value that is not in the folder gives the message, a listed one passes."""
    pack = load_pack()
    import folder_paths

    weights = sys.modules[pack.__name__ + ".nodes.weights_nodes"]
    denscore = sys.modules[pack.__name__ + ".nodes.denscore_nodes"]
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    (lora_dir / "mine.safetensors").write_bytes(b"")
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(lora_dir)], saved[1])
    try:
        folder_paths.filename_list_cache.pop("loras", None)
        node = weights.LongAlignLoadLongSDLoRA
        assert node.validate_inputs(lora_name="mine.safetensors") is True
        msg = node.validate_inputs(lora_name="sd15-reward-3750.pt")
        assert "Load LongSD LoRA" in msg and "sd15-reward-3750.pt" in msg and "mine.safetensors" in msg
    finally:
        folder_paths.folder_names_and_paths["loras"] = saved
        folder_paths.filename_list_cache.pop("loras", None)
    t5 = weights.LongAlignLoadT5Adapter.validate_inputs(t5_folder="no-such-t5", adapter_folder="s28750_adapter")
    assert "Load LongAlign T5 Adapter" in t5 and "t5_folder 'no-such-t5'" in t5 and "models/text_encoders/" in t5
    pref = denscore.LongAlignPreferenceModelLoader.validate_inputs(model_name="Denscore-missing")
    assert "Load Preference Model (Denscore)" in pref and "models/denscore/" in pref
