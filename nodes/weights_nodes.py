"""ComfyUI nodes that load LongAlign-finetuned weights: LongSD / trainer LoRAs and the LongSD T5 branch."""

from __future__ import annotations

import logging
import math

from comfy_api.latest import io

from ..longalign_core.dtypes import PRECISIONS
from ..longalign_core.errors import BadConfigError
from ..longalign_core.lora import diffusers_config_from_ldm, load_lora, lora_targets, to_kohya
from ..longalign_core.model_files import missing_model_message
from ..longalign_core.t5_branch import T5Branch, load_t5_branch
from . import host

log = logging.getLogger("LongAlign")

LongAlignT5 = io.Custom("LONGALIGN_T5")


class ManagedT5Branch:
    """What flows on a LONGALIGN_T5 link: the T5 branch, kept on ComfyUI's text-encoder offload device and loaded
    onto its text-encoder device through ComfyUI's memory manager (a ModelPatcher) for each encode."""

    def __init__(self, branch: T5Branch):
        self.branch = branch
        self.patcher = host.text_encoder_patcher({"t5_encoder": branch.encoder, "t5_adapter": branch.adapter})

    def count_tokens(self, text: str) -> int:
        return self.branch.count_tokens(text)

    def encode(self, text: str):
        host.load_patchers([self.patcher])
        return self.branch.encode(text)

#: Loaded T5 branches keyed by (t5 path, adapter path, mask): one explicit cache keyed by file paths.
_T5_CACHE: dict[tuple, object] = {}


class LongAlignLoadLongSDLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LongAlignLoadLongSDLoRA",
            display_name="Load LongSD LoRA",
            category="LongAlign/loaders",
            description="Applies a LongAlign UNet LoRA to a model as ComfyUI LoRA patches: the released LongSD "
                        ".pt files (s28750_lora_vis.pt, sd15-reward-3750.pt) or a .safetensors from "
                        "`python -m trainer.finetune` / `python -m longalign_core.lora`. Chain two of these to "
                        "stack the stage-1 and reward LoRAs.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch: SD1.5 for the released LongSD files (LongSD "
                                                "was trained on SD1.5); SD1.x, SD2.x or SDXL for a LoRA this "
                                                "pack trained or converted for that model."),
                io.Combo.Input("lora_name", options=host.list_loras(),
                               tooltip="A file in models/loras: LongSD .pt (list of tensors, read without "
                                       "unpickling code) or kohya-style .safetensors."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="LoRA strength; 1.0 is what LongSD was trained with."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the LoRA patches (the input model is unchanged).")],
        )

    @classmethod
    def validate_inputs(cls, lora_name):  # at queue time, instead of ComfyUI's "value not in list"
        return missing_model_message("Load LongSD LoRA", "lora_name", lora_name, "loras", host.list_loras())

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        if not math.isfinite(strength):  # ComfyUI's min/max check lets NaN through (every comparison is False)
            raise BadConfigError(f"Load LongSD LoRA: strength {strength} is not a number; use a value like 1.0")
        targets = lora_targets(diffusers_config_from_ldm(host.unet_config(model)))
        pairs = load_lora(host.lora_path(lora_name), targets)
        kohya = to_kohya(pairs)
        matched, total = host.count_unet_lora_matches(model, kohya)
        log.info("LongAlign: %s: %d of %d LoRA layers matched the model", lora_name, matched, total)
        if matched != total:  # checked before any patched model is built
            raise ValueError(f"{lora_name}: only {matched} of {total} LoRA layers match this model's UNet; it was "
                             f"made for another base model")
        return io.NodeOutput(host.apply_unet_lora(model, kohya, strength))


class LongAlignLoadT5Adapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LongAlignLoadT5Adapter",
            display_name="Load LongAlign T5 Adapter",
            category="LongAlign/loaders",
            description="The T5 branch of LongSD: a T5 encoder (google-t5/t5-large folder) and the LongSD text "
                        "adapter (s28750_adapter folder). Connect it to LongAlign Text Encode (positive and "
                        "negative) to append the T5 tokens to the CLIP segments.",
            inputs=[
                io.Combo.Input("t5_folder", options=host.list_model_folders("text_encoders"),
                               tooltip="A Hugging Face T5 folder in models/text_encoders (config.json, "
                                       "model.safetensors, tokenizer files), e.g. google-t5/t5-large."),
                io.Combo.Input("adapter_folder", options=host.list_model_folders(host.ADAPTER_FOLDER),
                               tooltip="The LongSD adapter folder in models/longalign (config.json + "
                                       "diffusion_pytorch_model.safetensors)."),
                io.Combo.Input("attention_mask", options=["none", "padding"], default="none",
                               tooltip="none = as LongSD was trained (padding tokens take part); padding = mask "
                                       "them (not what the released adapter saw).", extra_dict={"advanced": True}),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True,
                               tooltip="Weights and compute of the T5 encoder and adapter. auto: bf16 on a GPU "
                                       "that supports it, else fp32 (T5 overflows in fp16).",
                               extra_dict={"advanced": True}),
            ],
            outputs=[LongAlignT5.Output(tooltip="The T5 branch, for LongAlign Text Encode's longalign_t5 input.")],
        )

    @classmethod
    def validate_inputs(cls, t5_folder, adapter_folder):
        t5 = missing_model_message("Load LongAlign T5 Adapter", "t5_folder", t5_folder, "text_encoders",
                                   host.list_model_folders("text_encoders"))
        if t5 is not True:
            return t5
        return missing_model_message("Load LongAlign T5 Adapter", "adapter_folder", adapter_folder,
                                     host.ADAPTER_FOLDER, host.list_model_folders(host.ADAPTER_FOLDER))

    @classmethod
    def execute(cls, t5_folder, adapter_folder, attention_mask, precision="auto") -> io.NodeOutput:
        t5 = host.resolve_in("text_encoders", t5_folder, "T5 folder")
        adapter = host.resolve_in(host.ADAPTER_FOLDER, adapter_folder, "LongSD adapter folder")
        key = (t5, adapter, attention_mask, precision)
        if key not in _T5_CACHE:
            _T5_CACHE.clear()
            branch = load_t5_branch(t5, adapter, device=host.text_encoder_offload_device(),
                                    dtype=host.preferred_text_encoder_dtype(precision), attention_mask=attention_mask)
            _T5_CACHE[key] = ManagedT5Branch(branch)
        return io.NodeOutput(_T5_CACHE[key])


NODES = [LongAlignLoadLongSDLoRA, LongAlignLoadT5Adapter]
