"""LongAlign Text Encode against ComfyUI's CLIP Text Encode: one prompt, one seed, two images."""

from __future__ import annotations

from .content import LONG_PROMPT, NEGATIVE_PROMPT, SD15_CHECKPOINT
from .graph import Workflow
from .layout import ENCODER_W, ENCODERS_X, GREEN, LOADERS_X, LONGALIGN_WIDGETS, RED, TOP, decode, sample


def comparison() -> Workflow:
    """Two pipelines, one above the other, from one prompt, one checkpoint and one latent. Each row has its own
    MODEL/VAE corridor; Reroute nodes at the corridors' left ends carry the checkpoint's outputs to them."""
    wf = Workflow("comparison", "LongAlign vs CLIP Text Encode",
                    "One prompt, one seed, two text encoders, side by side",
                  ("one prompt, one seed", "CLIP Text Encode", "LongAlign Text Encode", "two images"))
    encoders_x = ENCODERS_X + 100  # a wider first gap: the prompts' and checkpoint's links fan out in it
    samplers_x = encoders_x + ENCODER_W + 140
    decoders_x = samplers_x + 320 + 120
    outputs_x = decoders_x + 210 + 100
    prompt = wf.add("PrimitiveStringMultiline", (LOADERS_X, TOP), (360, 280), title="Prompt", value=LONG_PROMPT)
    negative = wf.add("PrimitiveStringMultiline", (LOADERS_X, TOP + 340), (360, 110), title="Negative prompt",
                      value=NEGATIVE_PROMPT)
    ck = TOP + 340 + 110 + 60
    ckpt = wf.add("CheckpointLoaderSimple", (LOADERS_X, ck), (360, 98), ckpt_name=SD15_CHECKPOINT)
    # upper row: ComfyUI's own encoder
    n_pos = wf.add("CLIPTextEncode", (encoders_x, TOP), (ENCODER_W, 150), title="CLIP Text Encode (positive)",
                   colors=GREEN, text="")
    n_neg = wf.add("CLIPTextEncode", (encoders_x, TOP + 210), (ENCODER_W, 150), title="CLIP Text Encode (negative)",
                   colors=RED, text="")
    upper = TOP + 210 + 150 + 40  # the upper corridor
    latent = wf.add("EmptyLatentImage", (encoders_x, upper + 220), (ENCODER_W, 106), width=512, height=512,
                    batch_size=1)
    # lower row: LongAlign
    low = upper + 220 + 106 + 90
    pos = wf.add("LongAlignTextEncode", (encoders_x, low), (ENCODER_W, 300), title="LongAlign Text Encode (positive)",
                 colors=GREEN, text="", **LONGALIGN_WIDGETS)
    neg = wf.add("LongAlignTextEncode", (encoders_x, low + 360), (ENCODER_W, 244),
                 title="LongAlign Text Encode (negative)", colors=RED, text="", **LONGALIGN_WIDGETS)
    lower = low + 360 + 244 + 40  # the lower corridor
    for node in (n_pos, n_neg, pos, neg):
        wf.link(ckpt.out("CLIP"), node, "clip")
    wf.link(prompt.out("STRING"), n_pos, "text")
    wf.link(negative.out("STRING"), n_neg, "text")
    wf.link(prompt.out("STRING"), pos, "text")
    wf.link(negative.out("STRING"), neg, "text")
    settings = dict(seed=1234, steps=25, cfg=7.5, sampler="dpmpp_2m", scheduler="karras")
    rows = []
    for corridor, p, n, title in ((upper, n_pos, n_neg, "CLIP Text Encode"), (lower, pos, neg, "LongAlign")):
        model = wf.reroute(ckpt.out("MODEL"), (encoders_x + 20, corridor))
        vae = wf.reroute(ckpt.out("VAE"), (encoders_x + 20, corridor + 40))
        ks = sample(wf, model.out(""), p.out("CONDITIONING"), n.out("CONDITIONING"), latent.out("LATENT"), samplers_x,
                     corridor + 140, title=f"KSampler ({title})", **settings)
        rows.append(decode(wf, ks, vae.out(""), decoders_x, corridor + 20))
    save_n = wf.add("SaveImage", (outputs_x, TOP), (512, 560), title="Save Image (CLIP Text Encode result)",
                    filename_prefix="compare_clip_text_encode")
    save_l = wf.add("SaveImage", (outputs_x + 512 + 240, TOP), (512, 560), title="Save Image (LongAlign result)",
                    filename_prefix="compare_longalign")
    wf.link(rows[0].out("IMAGE"), save_n, "images")
    lift = wf.reroute(rows[1].out("IMAGE"), (outputs_x + 512 + 60, TOP + 560 + 80))
    wf.link(lift.out(""), save_l, "images")
    report = wf.add("PreviewAny", (samplers_x, low + 60), (ENCODER_W, 340), title="Preview as Text (segment report)")
    wf.link(pos.out("report"), report, "source")
    wf.note(
        "## CLIP Text Encode vs LongAlign Text Encode\n"
        "One prompt, one negative, one latent, the same seed and sampler: the only difference between the two "
        "images is the text-encode node. CLIP Text Encode cuts the prompt into 77-token chunks wherever the "
        "token count falls; LongAlign encodes whole sentences.\n\n"
        f"* `models/checkpoints/`: any SD1.5 checkpoint (`{SD15_CHECKPOINT}`).\n"
        "* Both KSamplers use seed 1234, *fixed*: change both to compare another seed.",
        (LOADERS_X, ck + 98 + 60), (360, 300))
    return wf
