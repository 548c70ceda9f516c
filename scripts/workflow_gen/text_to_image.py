"""Text to image with LongAlign Text Encode: SD1.5, LongSD (LoRAs + T5 branch), SDXL, SDXL with a trained LoRA."""

from __future__ import annotations

from .content import (LONG_PROMPT, LONGSD_ADAPTER_FOLDER, LONGSD_REWARD_LORA, LONGSD_STAGE1_LORA, LONGSD_T5_FOLDER,
                      SD15_CHECKPOINT, SDXL_CHECKPOINT, SDXL_LORA, SDXL_PROMPT, SDXL_TRAIN_COMMAND, TRAINER_LORA_FILE)
from .graph import Workflow
from .layout import CHECKPOINT_Y, ENCODERS_X, LOADERS_X, TOP, text_to_image


def long_prompt_sd15() -> Workflow:
    wf = Workflow("long_prompt_sd15", "LongAlign long prompt on SD1.5",
                  "A 13-sentence prompt, every sentence encoded, nothing cut",
                  ("Load Checkpoint", "LongAlign Text Encode", "KSampler", "Save Image"))
    text_to_image(wf, SD15_CHECKPOINT, LONG_PROMPT, 512, seed=42, steps=25, cfg=7.5, sampler="dpmpp_2m",
                  scheduler="karras", prefix="longalign_sd15", saved="SD1.5 image from the long prompt")
    wf.note(
        "## Long prompt on SD1.5\n"
        "**LongAlign Text Encode** replaces *CLIP Text Encode*: the prompt is split into sentences, each "
        "sentence is encoded by CLIP on its own, and the results are joined into one 240-token conditioning "
        "(no 77-token limit, nothing cut).\n\n"
        f"* **Load Checkpoint**: any SD1.5 checkpoint in `models/checkpoints` (e.g. `{SD15_CHECKPOINT}`).\n"
        "* Give positive and negative the same `token_budget` so they batch together.\n"
        "* **Preview as Text** shows the report: every sentence with its token count, and a `WARNING` line if "
        "anything was extended or cut.",
        (LOADERS_X, TOP), (360, 280))
    return wf


def longsd() -> Workflow:
    wf = Workflow("longsd", "LongAlign LongSD (LoRA, T5)",
                  "The paper's fine-tuned SD1.5: two LoRAs and the T5 branch",
                  ("LongSD LoRA x2", "T5 Adapter", "LongAlign Text Encode", "KSampler"))
    ckpt = wf.add("CheckpointLoaderSimple", (LOADERS_X, CHECKPOINT_Y), (360, 98), ckpt_name=SD15_CHECKPOINT)
    # The LoRA chain sits in the corridor between the two encoders, below the checkpoint's VAE link.
    lora_y = CHECKPOINT_Y + 140
    lora1 = wf.add("LongAlignLoadLongSDLoRA", (ENCODERS_X, lora_y), (210, 82), title="LongSD LoRA (stage 1)",
                   lora_name=LONGSD_STAGE1_LORA, strength=1.0)
    lora2 = wf.add("LongAlignLoadLongSDLoRA", (ENCODERS_X + 250, lora_y), (210, 82), title="LongSD LoRA (reward)",
                   lora_name=LONGSD_REWARD_LORA, strength=1.0)
    wf.link(ckpt.out("MODEL"), lora1, "model")
    wf.link(lora1.out("MODEL"), lora2, "model")
    t5 = wf.add("LongAlignLoadT5Adapter", (LOADERS_X, CHECKPOINT_Y + 98 + 60), (360, 130),
                t5_folder=LONGSD_T5_FOLDER, adapter_folder=LONGSD_ADAPTER_FOLDER, attention_mask="none",
                precision="auto")
    text_to_image(wf, SD15_CHECKPOINT, LONG_PROMPT, 512, seed=42, steps=25, cfg=7.5, sampler="uni_pc",
                  scheduler="normal", prefix="longsd", saved="LongSD image", model=lora2.out("MODEL"),
                  t5=t5.out("LONGALIGN_T5"), ckpt=ckpt, neg_y=lora_y + 82 + 70, sampler_y=lora_y)
    wf.note(
        "## LongSD (LongAlign's fine-tuned SD1.5)\n"
        "Files from the LongAlign release (`luping-liu/LongAlign`) and `google-t5/t5-large`:\n\n"
        f"* `models/checkpoints/`: SD1.5 (`{SD15_CHECKPOINT}`)\n"
        f"* `models/loras/`: `{LONGSD_STAGE1_LORA}` (stage 1, long-text fine-tuning) and "
        f"`{LONGSD_REWARD_LORA}` (reward fine-tuning), chained in this order\n"
        f"* `models/text_encoders/{LONGSD_T5_FOLDER}/`: the T5 folder (config.json, model.safetensors, "
        "tokenizer files)\n"
        f"* `models/longalign/{LONGSD_ADAPTER_FOLDER}/`: the adapter folder (config.json + "
        "diffusion_pytorch_model.safetensors)\n\n"
        "The T5 branch goes into **both** text encodes. Sampler settings are LongSD's: UniPC, 25 steps, "
        "CFG 7.5, 512x512.",
        (LOADERS_X, TOP), (360, 280))
    return wf


def sdxl_long_prompt() -> Workflow:
    wf = Workflow("sdxl_long_prompt", "LongAlign long prompt on SDXL",
                  "Long prompts on SDXL's two text encoders, 1024 px",
                  ("SDXL Checkpoint", "LongAlign Text Encode", "KSampler 1024 px", "Save Image"))
    text_to_image(wf, SDXL_CHECKPOINT, SDXL_PROMPT, 1024, seed=42, steps=30, cfg=7.0, sampler="dpmpp_2m",
                  scheduler="karras", prefix="longalign_sdxl", saved="SDXL image from the long prompt")
    wf.note(
        "## Long prompt on SDXL\n"
        "The same node on SDXL's two text encoders (CLIP-L + OpenCLIP-bigG): every sentence is encoded by "
        "both, giving a 240 x 2048 conditioning.\n\n"
        f"* `models/checkpoints/`: SDXL base (`{SDXL_CHECKPOINT}`) or any SDXL checkpoint.\n"
        "* SDXL's pooled vector comes from the **first** sentence (as ComfyUI does for long prompts): put the "
        "sentence that best sums up the image first.\n"
        "* 1024x1024 is SDXL's native size.",
        (LOADERS_X, TOP), (360, 280))
    return wf


def sdxl_longalign_lora() -> Workflow:
    """sdxl_long_prompt with a LongAlign-trained LoRA on the MODEL; the LoRA loader sits in the corridor
    between the two encoders (as longsd's LoRAs do), the Read me note below the checkpoint."""
    wf = Workflow("sdxl_longalign_lora", "LongAlign LoRA on SDXL",
                  "SDXL with a LoRA from this pack's trainer, long prompts",
                  ("SDXL Checkpoint", "LongAlign LoRA", "LongAlign Text Encode", "KSampler 1024 px"))
    ckpt = wf.add("CheckpointLoaderSimple", (LOADERS_X, CHECKPOINT_Y), (360, 98), ckpt_name=SDXL_CHECKPOINT)
    lora_y = CHECKPOINT_Y + 140
    lora = wf.add("LoraLoaderModelOnly", (ENCODERS_X, lora_y), (360, 82), title="Load LoRA (LongAlign SDXL LoRA)",
                  lora_name=SDXL_LORA, strength_model=1.0)
    wf.link(ckpt.out("MODEL"), lora, "model")
    text_to_image(wf, SDXL_CHECKPOINT, SDXL_PROMPT, 1024, seed=42, steps=30, cfg=7.0, sampler="dpmpp_2m",
                  scheduler="karras", prefix="longalign_sdxl_lora", saved="SDXL image with the LongAlign LoRA",
                  model=lora.out("MODEL"), ckpt=ckpt, neg_y=lora_y + 82 + 70, sampler_y=lora_y)
    wf.note(
        "## LongAlign LoRA on SDXL\n"
        "SDXL with a LoRA fine-tuned by this pack's trainer (LongAlign's reward stage: segment-level preference "
        "optimisation with Denscore) and **LongAlign Text Encode** for the long prompt.\n\n"
        f"* `models/checkpoints/`: the SDXL checkpoint the LoRA was trained on (`{SDXL_CHECKPOINT}`).\n"
        f"* `models/loras/`: `{SDXL_LORA}`. Make it with the trainer (GPU):\n\n"
        f"  `{SDXL_TRAIN_COMMAND}`\n\n"
        f"  then copy `outputs/sdxl/{TRAINER_LORA_FILE}` to `models/loras/{SDXL_LORA}`.\n"
        "* `strength_model` 0 gives the base model: same seed, compare.",
        (LOADERS_X, CHECKPOINT_Y + 98 + 60), (360, 330))
    return wf
