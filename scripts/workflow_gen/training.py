"""The whole LongAlign loop in ComfyUI: will it fit, train, evaluate, and the new LoRA beside the base model."""

from __future__ import annotations

from .content import DENSCORE_FOLDER, LONG_PROMPT, NEGATIVE_PROMPT, SD15_CHECKPOINT, TRAINED_LORA_NAME, \
    TRAINING_PROMPTS
from .graph import Workflow
from .layout import ENCODER_W, GREEN, LOADERS_X, LONGALIGN_WIDGETS, RED, SAMPLER_SIZE, TOP, decode, sample

#: The trainer's defaults as the Train LoRA node shows them (nodes/training_nodes.py reads them from the trainer).
TRAIN_OPTIONS = dict(steps=3750, lora_rank=32, learning_rate=3e-05, batch_size=8, gradient_accumulation=1,
                     resolution=0, sample_steps=50, gradient_steps=5, omega=0.3, training_seed=0,
                     reward_direction="auto", mixed_precision="auto",
                     checkpoint_every=500, overwrite=False, strength=1.0, validation_every=500, extra_options="")
EVALUATE_OPTIONS = dict(strength=1.0, lora_name_2="", strength_2=1.0, prompts="", num_prompts=0, seeds=2, steps=0,
                        first_seed=0, run_name="longalign_eval", resolution=0,
                        extra_options="")


def train_and_evaluate() -> Workflow:
    """Upper row: LongAlign Train LoRA (shipped in mode *will it fit*), its summary, LongAlign Evaluate LoRA on
    the LoRA it names, the evaluation's grid and summary. Lower row: the checkpoint sampled with and without the
    new LoRA (Train LoRA's MODEL output), one row each. The checkpoint's links reach the lower row through
    Reroutes in the gap left of the encoders and a corridor between them; the decoders sit in the band between
    the samplers, where the VAE reaches them without crossing a sampler."""
    wf = Workflow("train_and_evaluate", "LongAlign train and evaluate a LoRA on your checkpoint",
                  "Will it fit, train, evaluate, then compare with the base",
                  ("will it fit | train", "LongAlign Train LoRA", "LongAlign Evaluate LoRA", "base vs LoRA"))
    nodes_x = LOADERS_X + 360 + 180  # a wide first gap: the checkpoint's links run down it to the lower row
    hops_x = LOADERS_X + 360 + 20  # Reroutes in that gap
    evaluate_x = nodes_x + 400 + 140
    previews_x = evaluate_x + 400 + 100
    ck = 620  # the checkpoint; MODEL / CLIP / VAE leave at ck + 14 / 34 / 54
    lower_y = TOP + 700 + 60  # the lower row, below the Train LoRA node
    corridor_y = lower_y + 244 + 30  # between the lower row's encoders: MODEL at corridor_y + 14, VAE 40 below
    samplers_x = nodes_x + ENCODER_W + 320
    decoders_x = samplers_x + SAMPLER_SIZE[0] + 100
    images_x = decoders_x + 210 + 60
    ckpt = wf.add("CheckpointLoaderSimple", (LOADERS_X, ck), (360, 98), ckpt_name=SD15_CHECKPOINT)
    # upper row: will it fit / train, then evaluate
    train = wf.add("LongAlignTrainLoRA", (nodes_x, TOP), (400, 700), mode="will it fit", ckpt_name=SD15_CHECKPOINT,
                   preference_model=DENSCORE_FOLDER, prompts=TRAINING_PROMPTS, prompts_file="(none)",
                   lora_name=TRAINED_LORA_NAME, **TRAIN_OPTIONS)
    wf.link(ckpt.out("MODEL"), train, "model")
    evaluate = wf.add("LongAlignEvaluateLoRA", (evaluate_x, TOP), (400, 488), mode="evaluate",
                      ckpt_name=SD15_CHECKPOINT, lora_name="", preference_model=DENSCORE_FOLDER, **EVALUATE_OPTIONS)
    wf.link(train.out("lora_name"), evaluate, "lora_name")  # also makes the evaluation wait for the training
    train_summary = wf.add("PreviewAny", (evaluate_x, TOP + 488 + 60), (400, 150),
                           title="Preview as Text (will it fit / training summary)")
    wf.link(train.out("summary"), train_summary, "source")
    grid = wf.add("PreviewImage", (previews_x, TOP), (480, 330), title="Preview Image (evaluation grid)")
    wf.link(evaluate.out("grid"), grid, "images")
    eval_summary = wf.add("PreviewAny", (previews_x, TOP + 330 + 60), (480, 310),
                          title="Preview as Text (evaluation summary)")
    wf.link(evaluate.out("summary"), eval_summary, "source")
    # lower row: one prompt, one seed, the checkpoint with and without the new LoRA
    pos = wf.add("LongAlignTextEncode", (nodes_x, lower_y), (ENCODER_W, 244), title="LongAlign Text Encode (positive)",
                 colors=GREEN, text=LONG_PROMPT, **LONGALIGN_WIDGETS)
    neg = wf.add("LongAlignTextEncode", (nodes_x, corridor_y + 130), (ENCODER_W, 244),
                 title="LongAlign Text Encode (negative)", colors=RED, text=NEGATIVE_PROMPT, **LONGALIGN_WIDGETS)
    for node in (pos, neg):
        wf.link(ckpt.out("CLIP"), node, "clip")
    model_down = wf.reroute(ckpt.out("MODEL"), (hops_x, corridor_y))
    vae_down = wf.reroute(ckpt.out("VAE"), (hops_x, corridor_y + 40))
    # at the encoders' end of the gap, before the links between the rows cross the corridor
    model_hop = wf.reroute(model_down.out(""), (nodes_x + ENCODER_W + 5, corridor_y))
    vae_hop = wf.reroute(vae_down.out(""), (nodes_x + ENCODER_W + 5, corridor_y + 40))
    lora_model = wf.reroute(train.out("model"), (nodes_x + 400 + 30, lower_y - 60))
    base_y = corridor_y + 156
    latent = wf.add("EmptyLatentImage", (nodes_x + ENCODER_W + 10, base_y + 140), (210, 106), width=512,
                    height=512, batch_size=1)
    settings = dict(seed=1234, steps=25, cfg=7.5, sampler="dpmpp_2m", scheduler="karras")
    ks_lora = sample(wf, lora_model.out(""), pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent.out("LATENT"),
                     samplers_x, lower_y, title="KSampler (LoRA)", **settings)
    ks_base = sample(wf, model_hop.out(""), pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent.out("LATENT"),
                     samplers_x, base_y, title="KSampler (base)", **settings)
    dec_lora = decode(wf, ks_lora, vae_hop.out(""), decoders_x, corridor_y - 10)
    dec_base = decode(wf, ks_base, vae_hop.out(""), decoders_x, corridor_y + 80)
    for dec, row_y, name in ((dec_lora, lower_y, "LoRA"), (dec_base, base_y, "base")):
        save = wf.add("SaveImage", (images_x, row_y), (420, SAMPLER_SIZE[1]), title=f"Save Image ({name})",
                      filename_prefix=f"longalign_trained_{name.lower()}")
        wf.link(dec.out("IMAGE"), save, "images")
    wf.note(
        "## Train and evaluate a LoRA on your checkpoint\n"
        "LongAlign's reward fine-tuning inside ComfyUI, in four steps. The training runs as a separate process "
        "with ComfyUI's own Python (ComfyUI's models are unloaded first); Cancel keeps a checkpoint.\n\n"
        f"* `models/checkpoints/`: your SD1.5 or SDXL checkpoint (`{SD15_CHECKPOINT}`); pick the **same** "
        "file in Load Checkpoint, Train LoRA and Evaluate LoRA.\n"
        f"* `models/denscore/{DENSCORE_FOLDER}/`: the Denscore folder (the judge).\n"
        "* Prompts: yours, one per line in Train LoRA, or a `.txt` / `.jsonl` file in ComfyUI's `input/` "
        "chosen as `prompts_file`.\n\n"
        "1. **Will it fit**: right-click *LongAlign Train LoRA* → *Queue Selected Output Nodes*: memory per "
        "part and time per step, nothing trained.\n"
        "2. **Train**: set `mode` to *train* and Run. The LoRA lands in "
        f"`models/loras/{TRAINED_LORA_NAME}.safetensors` when complete; after a Cancel, *resume* goes on.\n"
        "3. **Evaluate** runs next: base vs LoRA over the pack's 64 held-out prompts, with intervals.\n"
        "4. The two KSamplers show one prompt with and without the LoRA (same seed).",
        (LOADERS_X, TOP), (360, 500))
    return wf
