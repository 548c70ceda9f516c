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
    """One prompt, one seed, one latent: the checkpoint alone (upper row) and with the LoRA (lower row). Each
    row reads left to right: sampler, its own Denscore Score with the image below it, the chart with the
    numbers below it, so the base's results sit right above the LoRA's. The shared pieces (prompt, latent,
    checkpoint, encoders, LoRA loader) are on the left; the latent's, MODEL's and VAE's links cross the
    encoders' column through one corridor to three Reroutes that feed both rows; both decoders sit in the band
    between the samplers, where the VAE reaches them without crossing a sampler; the prompt's text runs above
    everything to a Reroute that feeds both Denscore nodes."""
    wf = Workflow("lora_vs_base", "LongAlign LoRA vs base by Denscore",
                  "Same seed with and without the LoRA, scored by sentence",
                  ("one prompt, one seed", "without the LoRA | with", "Denscore Score x2", "one row per model"))
    upper_y = 140  # the rows start below the prompt's text link (y = TOP + 14)
    corridor_y = 400  # the latent's output leaves at corridor_y + 14, the checkpoint's below it
    encoders_x = ENCODERS_X + 100
    reroutes_x = encoders_x + ENCODER_W + 40
    samplers_x = reroutes_x + 75 + 180
    decoders_x = samplers_x + 320 + 80
    scores_x = decoders_x + 273 + 140
    results_x = scores_x + 320 + 80
    prompt = wf.add("PrimitiveStringMultiline", (LOADERS_X, TOP), (360, 280), title="Prompt", value=LONG_PROMPT)
    latent = wf.add("EmptyLatentImage", (LOADERS_X, corridor_y), (360, 106), width=512, height=512, batch_size=1)
    ck = corridor_y + 106 + 60  # MODEL / CLIP / VAE leave at ck + 14 / 34 / 54
    ckpt = wf.add("CheckpointLoaderSimple", (LOADERS_X, ck), (360, 98), ckpt_name=SD15_CHECKPOINT)
    pos = wf.add("LongAlignTextEncode", (encoders_x, upper_y), (ENCODER_W, 244),
                 title="LongAlign Text Encode (positive)", colors=GREEN, text="", **LONGALIGN_WIDGETS)
    lower_y = ck + 54 + 70  # the lower row, below the corridor
    lora = wf.add("LoraLoaderModelOnly", (encoders_x, lower_y), (360, 82), title="Load LoRA (LongAlign SD1.5 LoRA)",
                  lora_name=SD15_LORA, strength_model=1.0)
    neg = wf.add("LongAlignTextEncode", (encoders_x, lower_y + 82 + 70), (ENCODER_W, 244),
                 title="LongAlign Text Encode (negative)", colors=RED, text=NEGATIVE_PROMPT, **LONGALIGN_WIDGETS)
    for node in (pos, neg):
        wf.link(ckpt.out("CLIP"), node, "clip")
    wf.link(prompt.out("STRING"), pos, "text")
    wf.link(ckpt.out("MODEL"), lora, "model")
    latent_hop = wf.reroute(latent.out("LATENT"), (reroutes_x, corridor_y))
    model_hop = wf.reroute(ckpt.out("MODEL"), (reroutes_x, ck))
    vae_hop = wf.reroute(ckpt.out("VAE"), (reroutes_x, ck + 40))
    settings = dict(seed=1234, steps=25, cfg=7.5, sampler="dpmpp_2m", scheduler="karras")
    ks_base = sample(wf, model_hop.out(""), pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent_hop.out(""),
                     samplers_x, upper_y, title="KSampler (base)", **settings)
    ks_lora = sample(wf, lora.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent_hop.out(""),
                     samplers_x, lower_y, title="KSampler (LoRA)", **settings)
    dec_base = decode(wf, ks_base, vae_hop.out(""), decoders_x, lower_y - 200)
    dec_lora = decode(wf, ks_lora, vae_hop.out(""), decoders_x, lower_y - 100)
    # the judge: one preference model, one Denscore Score per image
    loader = wf.add("LongAlignPreferenceModelLoader", (decoders_x, upper_y), (273, 106),
                    model_name=DENSCORE_FOLDER, kind="auto", precision="auto")
    text_hop = wf.reroute(prompt.out("STRING"), (scores_x - 160, TOP))
    score_h, image_h, gap = 290, 320, 50
    for name, row_y, dec in (("base", upper_y, dec_base), ("LoRA", upper_y + score_h + gap + image_h + 60, dec_lora)):
        score = wf.add("LongAlignDenscoreScore", (scores_x, row_y), (320, score_h), title=f"Denscore Score ({name})",
                       text="", omega=0.3, reference_prompts="", split_mode="sentence")
        wf.link(loader.out("DENSCORE_MODEL"), score, "denscore_model")
        wf.link(dec.out("IMAGE"), score, "images")
        wf.link(text_hop.out(""), score, "text")
        image = wf.add("SaveImage", (scores_x, row_y + score_h + gap), (320, image_h), title=f"Save Image ({name})",
                       filename_prefix=f"lora_vs_base_{name.lower()}")
        wf.link(dec.out("IMAGE"), image, "images")
        chart = wf.add("SaveImage", (results_x, row_y), (420, 300), title=f"Save Image (Denscore chart, {name})",
                       filename_prefix=f"lora_vs_base_chart_{name.lower()}")
        wf.link(score.out("chart"), chart, "images")
        numbers = wf.add("PreviewAny", (results_x, row_y + 300 + gap), (420, 190),
                         title=f"Preview as Text (Denscore numbers, {name})")
        wf.link(score.out("report"), numbers, "source")
    wf.note(
        "## LoRA vs base by Denscore\n"
        "Did the LoRA help on *this* prompt? One **Prompt**, one negative, one latent and the same seed: the "
        "upper sampler uses the checkpoint alone, the lower one the checkpoint with the LoRA, so the LoRA is the "
        "only difference. Each image gets its own **Denscore Score**: the image, the chart (per sentence: grey = "
        "text-irrelevant, blue = text-relevant) and the numbers, the base's row above the LoRA's.\n\n"
        f"* `models/checkpoints/`: the SD1.5 checkpoint the LoRA was trained on (`{SD15_CHECKPOINT}`).\n"
        f"* `models/loras/`: `{SD15_LORA}`, the trainer's `{TRAINER_LORA_FILE}` renamed.\n"
        f"* `models/denscore/{DENSCORE_FOLDER}/`: the Denscore folder.\n"
        "* One prompt and one seed is an anecdote: for a verdict over many prompts, with confidence intervals, "
        f"run `{SD15_EVAL_COMMAND}`.",
        (LOADERS_X, ck + 98 + 60), (360, 420))
    return wf
