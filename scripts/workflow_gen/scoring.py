"""Workflows that judge images with Denscore: best of a batch, and a LoRA against its base model."""

from __future__ import annotations

from .content import DENSCORE_FOLDER, LONG_PROMPT, NEGATIVE_PROMPT, SD15_CHECKPOINT, SD15_EVAL_COMMAND, SD15_LORA, \
    TRAINER_LORA_FILE
from .graph import Workflow
from .layout import (DECODERS_X, ENCODER_W, ENCODERS_X, GREEN, LOADERS_X, LONGALIGN_WIDGETS, RED, SAMPLERS_X, TOP,
                     decode, encode_pair, sample)


def denscore_best_of_n() -> Workflow:
    """The prompt's links to the two Denscore nodes run above the generation graph (to Denscore Score, level)
    and diagonally down through free space (to Best-of-N)."""
    wf = Workflow("denscore_best_of_n", "LongAlign best of 4 by Denscore",
                  "Score 4 images sentence by sentence and keep the best",
                  ("KSampler (batch of 4)", "Denscore Score", "Denscore Best-of-N", "Save Image"))
    y0 = 240  # the generation graph starts below the prompt's links
    ck = y0 + 340  # checkpoint
    prompt = wf.add("PrimitiveStringMultiline", (LOADERS_X, TOP), (360, 280), title="Prompt", value=LONG_PROMPT)
    ckpt = wf.add("CheckpointLoaderSimple", (LOADERS_X, ck), (360, 98), ckpt_name=SD15_CHECKPOINT)
    pos, neg = encode_pair(wf, ckpt.out("CLIP"), "", NEGATIVE_PROMPT, y0, ck + 200)
    wf.link(prompt.out("STRING"), pos, "text")
    latent = wf.add("EmptyLatentImage", (ENCODERS_X, ck + 200 + 244 + 60), (ENCODER_W, 106), width=512, height=512,
                    batch_size=4)
    ks = sample(wf, ckpt.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent.out("LATENT"),
                 SAMPLERS_X, ck + 120, seed=7, steps=25, cfg=7.5, sampler="dpmpp_2m", scheduler="karras")
    dec = decode(wf, ks, ckpt.out("VAE"), DECODERS_X, ck + 20)
    loader = wf.add("LongAlignPreferenceModelLoader", (DECODERS_X, ck + 320), (320, 106), model_name=DENSCORE_FOLDER,
                    kind="auto", precision="auto")
    scores_x = DECODERS_X + 320 + 100
    score = wf.add("LongAlignDenscoreScore", (scores_x, TOP + 14 - 136), (420, 420), text="", omega=0.3,
                   reference_prompts="", split_mode="sentence")
    best = wf.add("LongAlignDenscoreBestOfN", (scores_x, TOP + 14 - 136 + 420 + 70), (420, 290), text="", omega=0.3,
                  rank_by="score", reference_prompts="", split_mode="sentence")
    for node in (score, best):
        wf.link(loader.out("DENSCORE_MODEL"), node, "denscore_model")
        wf.link(dec.out("IMAGE"), node, "images")
        wf.link(prompt.out("STRING"), node, "text")
    batch = wf.add("PreviewImage", (scores_x, best.pos[1] + 290 + 70), (420, 300), title="Preview Image (all 4)")
    wf.link(dec.out("IMAGE"), batch, "images")
    outputs_x = scores_x + 420 + 100
    numbers = wf.add("PreviewAny", (outputs_x, score.pos[1]), (600, 190), title="Preview as Text (Denscore numbers)")
    wf.link(score.out("report"), numbers, "source")
    chart = wf.add("SaveImage", (outputs_x, numbers.pos[1] + 190 + 70), (600, 330), title="Save Image (Denscore chart)",
                   filename_prefix="denscore_chart")
    wf.link(score.out("chart"), chart, "images")
    save = wf.add("SaveImage", (outputs_x, chart.pos[1] + 330 + 70), (600, 400), title="Save Image (best of 4)",
                  filename_prefix="denscore_best")
    wf.link(best.out("best_image"), save, "images")
    ranking = wf.add("PreviewAny", (outputs_x, save.pos[1] + 400 + 70), (600, 190), title="Preview as Text (ranking)")
    wf.link(best.out("report"), ranking, "source")
    wf.note(
        "## Best of 4 by Denscore\n"
        "One **Prompt** node feeds the text encode and both Denscore nodes, so the images are scored against "
        "the prompt they were made from. The sampler makes a batch of 4; **Denscore Score** charts each "
        "sentence's score per image (blue = text-relevant, grey = text-irrelevant) and shows the numbers; "
        "**Denscore Best-of-N** keeps the best image.\n\n"
        f"* `models/denscore/{DENSCORE_FOLDER}/`: the `luping-liu/Denscore` folder (config.json + "
        "model.safetensors). PickScore / CLIP-H folders or an HPSv2 `.pt` work too.\n"
        "* `models/checkpoints/`: any SD1.5 checkpoint.\n"
        "* `rank_by`: score, text_relevant (alignment only) or reweighted.",
        (LOADERS_X, ck + 98 + 60), (360, 360))
    return wf


def lora_vs_base() -> Workflow:
    """One prompt, one seed, one latent: the checkpoint with the LoRA (upper row) and without (lower row), each
    image scored by its own Denscore Score; the LoRA's chart, numbers and image (``lora_outputs_x``) beside the
    base's (``base_outputs_x``). The encoders' column is moved right to widen the gap the lower row's MODEL and
    VAE links drop through (as in comparison). The prompt's text reaches the upper Denscore node level above the
    graph and the lower one through a Reroute above the samplers; the lower row's outputs reach the base's
    column through Reroutes below the LoRA's."""
    wf = Workflow("lora_vs_base", "LongAlign LoRA vs base by Denscore",
                  "Same seed with and without the LoRA, scored by sentence",
                  ("one prompt, one seed", "with the LoRA | without", "Denscore Score x2", "charts side by side"))
    y0 = 240  # the generation graph starts below the prompt's links
    ck = y0 + 340  # checkpoint: MODEL / CLIP / VAE outputs at ck + 14 / 34 / 54
    encoders_x = ENCODERS_X + 100
    samplers_x = encoders_x + ENCODER_W + 160
    decoders_x = samplers_x + 320 + 180
    scores_x = decoders_x + 320 + 200  # Denscore nodes: a wide gap before them for the links to them
    prompt = wf.add("PrimitiveStringMultiline", (LOADERS_X, TOP), (360, 280), title="Prompt", value=LONG_PROMPT)
    ckpt = wf.add("CheckpointLoaderSimple", (LOADERS_X, ck), (360, 98), ckpt_name=SD15_CHECKPOINT)
    pos = wf.add("LongAlignTextEncode", (encoders_x, y0), (ENCODER_W, 300), title="LongAlign Text Encode (positive)",
                 colors=GREEN, text="", **LONGALIGN_WIDGETS)
    lora = wf.add("LoraLoaderModelOnly", (encoders_x, ck + 140), (360, 82), title="Load LoRA (LongAlign SD1.5 LoRA)",
                  lora_name=SD15_LORA, strength_model=1.0)
    neg_y = ck + 140 + 82 + 70
    neg = wf.add("LongAlignTextEncode", (encoders_x, neg_y), (ENCODER_W, 244), title="LongAlign Text Encode (negative)",
                 colors=RED, text=NEGATIVE_PROMPT, **LONGALIGN_WIDGETS)
    for node in (pos, neg):
        wf.link(ckpt.out("CLIP"), node, "clip")
    wf.link(prompt.out("STRING"), pos, "text")
    latent = wf.add("EmptyLatentImage", (encoders_x, neg_y + 244 + 60), (ENCODER_W, 106), width=512, height=512,
                    batch_size=1)
    settings = dict(seed=1234, steps=25, cfg=7.5, sampler="dpmpp_2m", scheduler="karras")
    # upper row: the LoRA on the checkpoint's MODEL; the VAE link passes above its sampler
    wf.link(ckpt.out("MODEL"), lora, "model")
    ks_lora = sample(wf, lora.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"),
                      latent.out("LATENT"), samplers_x, ck + 140, title="KSampler (LoRA)", **settings)
    dec_lora = decode(wf, ks_lora, ckpt.out("VAE"), decoders_x, ck + 20)
    # lower row: the checkpoint alone, its MODEL and VAE through Reroutes in the corridor below the latent
    low = latent.pos[1] + 106 + 40
    model = wf.reroute(ckpt.out("MODEL"), (encoders_x + 20, low))
    vae = wf.reroute(ckpt.out("VAE"), (encoders_x + 20, low + 40))
    ks_base = sample(wf, model.out(""), pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent.out("LATENT"),
                      samplers_x, low + 140, title="KSampler (base)", **settings)
    dec_base = decode(wf, ks_base, vae.out(""), decoders_x, low + 20)
    # the judge: one preference model, one Denscore Score per image
    loader = wf.add("LongAlignPreferenceModelLoader", (decoders_x, 800), (320, 106),
                    model_name=DENSCORE_FOLDER, kind="auto", precision="auto")
    score_lora = wf.add("LongAlignDenscoreScore", (scores_x, TOP + 14 - 136), (420, 420), title="Denscore Score (LoRA)",
                        text="", omega=0.3, reference_prompts="", split_mode="sentence")
    score_base = wf.add("LongAlignDenscoreScore", (scores_x, 1180), (420, 420), title="Denscore Score (base)",
                        text="", omega=0.3, reference_prompts="", split_mode="sentence")
    text_hop = wf.reroute(prompt.out("STRING"), (scores_x - 90, 450))
    for node, image, text in ((score_lora, dec_lora, prompt.out("STRING")), (score_base, dec_base, text_hop.out(""))):
        wf.link(loader.out("DENSCORE_MODEL"), node, "denscore_model")
        wf.link(image.out("IMAGE"), node, "images")
        wf.link(text, node, "text")
    # outputs: the LoRA's column, then the base's, in the same order
    lora_outputs_x = scores_x + 420 + 100
    base_outputs_x = lora_outputs_x + 420 + 260  # room for the links rising to it
    nodes = {}
    for x, name in ((lora_outputs_x, "LoRA"), (base_outputs_x, "base")):
        chart = wf.add("SaveImage", (x, TOP - 8), (420, 300), title=f"Save Image (Denscore chart, {name})",
                       filename_prefix=f"lora_vs_base_chart_{name.lower()}")
        numbers = wf.add("PreviewAny", (x, TOP - 8 + 300 + 70), (420, 190),
                         title=f"Preview as Text (Denscore numbers, {name})")
        image = wf.add("SaveImage", (x, TOP - 8 + 300 + 70 + 190 + 70), (420, 460), title=f"Save Image ({name})",
                       filename_prefix=f"lora_vs_base_{name.lower()}")
        nodes[name] = (chart, numbers, image)
    chart, numbers, image = nodes["LoRA"]
    wf.link(score_lora.out("chart"), chart, "images")
    wf.link(score_lora.out("report"), numbers, "source")
    wf.link(dec_lora.out("IMAGE"), image, "images")
    # the base's links run below its Denscore node, then up between the columns
    lift_x, lift_y = lora_outputs_x + 420 + 20, score_base.pos[1] + 420 + 60
    under = wf.reroute(dec_base.out("IMAGE"), (scores_x + 20, lift_y + 80))
    for k, (src, target, input_name) in enumerate(zip(
            (score_base.out("chart"), score_base.out("report"), under.out("")), nodes["base"],
            ("images", "source", "images"))):
        hop = wf.reroute(src, (lift_x, lift_y + 40 * k))
        wf.link(hop.out(""), target, input_name)
    wf.note(
        "## LoRA vs base by Denscore\n"
        "Did the LoRA help on *this* prompt? One **Prompt**, one negative, one latent and the same seed: the "
        "upper sampler uses the checkpoint with the LoRA, the lower one the checkpoint alone, so the LoRA is the "
        "only difference. Each image gets its own **Denscore Score**: the chart (per sentence: grey = "
        "text-irrelevant, blue = text-relevant) and the numbers, LoRA on the left, base on the right.\n\n"
        f"* `models/checkpoints/`: the SD1.5 checkpoint the LoRA was trained on (`{SD15_CHECKPOINT}`).\n"
        f"* `models/loras/`: `{SD15_LORA}`, the trainer's `{TRAINER_LORA_FILE}` renamed.\n"
        f"* `models/denscore/{DENSCORE_FOLDER}/`: the Denscore folder.\n"
        "* One prompt and one seed is an anecdote: for a verdict over many prompts, with confidence intervals, "
        f"run `{SD15_EVAL_COMMAND}`.",
        (LOADERS_X, ck + 98 + 60), (360, 420))
    return wf
