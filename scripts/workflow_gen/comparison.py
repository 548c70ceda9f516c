"""LongAlign Text Encode against ComfyUI's CLIP Text Encode: one prompt, one seed, two images."""

from __future__ import annotations

from .content import LONG_PROMPT, NEGATIVE_PROMPT, SD15_CHECKPOINT
from .graph import Workflow
from .layout import ENCODER_W, ENCODERS_X, GREEN, LOADERS_X, LONGALIGN_WIDGETS, RED, SAMPLER_SIZE, TOP, decode, \
    sample


def comparison() -> Workflow:
    """Two rows that read left to right, CLIP Text Encode's above LongAlign's, from one prompt, one negative, one
    checkpoint and one latent: encoders, sampler, decoder, image. The checkpoint's MODEL and VAE run through the
    band between the rows to two Reroutes, which feed both rows; the latent sits in that band under the upper
    encoders. The upper row's decoder sits in the band below its sampler and the lower row's just above its own,
    so that the VAE link reaches both without crossing a sampler."""
    wf = Workflow("comparison", "LongAlign vs CLIP Text Encode",
                  "One prompt, one seed: CLIP Text Encode's image above LongAlign's",
                  ("one prompt, one seed", "CLIP Text Encode", "LongAlign Text Encode", "two images"))
    encoders_x = ENCODERS_X + 100  # a wider first gap: the prompts' and checkpoint's links fan out in it
    reroutes_x = encoders_x + ENCODER_W + 30  # the MODEL / VAE Reroutes, between encoders and samplers
    samplers_x = reroutes_x + 75 + 250
    decoders_x = samplers_x + SAMPLER_SIZE[0] + 100
    images_x = decoders_x + 210 + 100
    band_y = 570  # the band between the rows: the checkpoint's MODEL / CLIP / VAE leave at band_y + 14 / 34 / 54
    lower_y = band_y + 150  # the lower row's top
    prompt = wf.add("PrimitiveStringMultiline", (LOADERS_X, TOP), (360, 280), title="Prompt", value=LONG_PROMPT)
    negative = wf.add("PrimitiveStringMultiline", (LOADERS_X, TOP + 340), (360, 110), title="Negative prompt",
                      value=NEGATIVE_PROMPT)
    ckpt = wf.add("CheckpointLoaderSimple", (LOADERS_X, band_y), (360, 98), ckpt_name=SD15_CHECKPOINT)
    # upper row: ComfyUI's own encoder
    n_pos = wf.add("CLIPTextEncode", (encoders_x, TOP), (ENCODER_W, 150), title="CLIP Text Encode (positive)",
                   colors=GREEN, text="")
    n_neg = wf.add("CLIPTextEncode", (encoders_x, TOP + 190), (ENCODER_W, 150), title="CLIP Text Encode (negative)",
                   colors=RED, text="")
    latent = wf.add("EmptyLatentImage", (encoders_x, TOP + 190 + 150 + 40), (ENCODER_W, 106), width=512,
                    height=512, batch_size=1)
    # lower row: LongAlign
    pos = wf.add("LongAlignTextEncode", (encoders_x, lower_y), (ENCODER_W, 300),
                 title="LongAlign Text Encode (positive)", colors=GREEN, text="", **LONGALIGN_WIDGETS)
    neg = wf.add("LongAlignTextEncode", (encoders_x, lower_y + 360), (ENCODER_W, 244),
                 title="LongAlign Text Encode (negative)", colors=RED, text="", **LONGALIGN_WIDGETS)
    for node in (n_pos, n_neg, pos, neg):
        wf.link(ckpt.out("CLIP"), node, "clip")
    wf.link(prompt.out("STRING"), n_pos, "text")
    wf.link(negative.out("STRING"), n_neg, "text")
    wf.link(prompt.out("STRING"), pos, "text")
    wf.link(negative.out("STRING"), neg, "text")
    model = wf.reroute(ckpt.out("MODEL"), (reroutes_x, band_y))
    vae = wf.reroute(ckpt.out("VAE"), (reroutes_x, band_y + 40))
    settings = dict(seed=1234, steps=25, cfg=7.5, sampler="dpmpp_2m", scheduler="karras")
    rows = []
    for row_y, decoder_y, p, n, title in ((TOP, band_y - 50, n_pos, n_neg, "CLIP Text Encode"),
                                          (lower_y + 10, band_y + 50, pos, neg, "LongAlign")):
        ks = sample(wf, model.out(""), p.out("CONDITIONING"), n.out("CONDITIONING"), latent.out("LATENT"),
                    samplers_x, row_y, title=f"KSampler ({title})", **settings)
        rows.append((row_y, decode(wf, ks, vae.out(""), decoders_x, decoder_y)))
    for (row_y, dec), (title, prefix) in zip(rows, (("CLIP Text Encode result", "compare_clip_text_encode"),
                                                    ("LongAlign result", "compare_longalign"))):
        save = wf.add("SaveImage", (images_x, row_y), (512, 560), title=f"Save Image ({title})",
                      filename_prefix=prefix)
        wf.link(dec.out("IMAGE"), save, "images")
    report = wf.add("PreviewAny", (samplers_x, lower_y + 10 + SAMPLER_SIZE[1] + 70), (ENCODER_W, 340),
                    title="Preview as Text (segment report)")
    wf.link(pos.out("report"), report, "source")
    wf.note(
        "## CLIP Text Encode vs LongAlign Text Encode\n"
        "One prompt, one negative, one latent, the same seed and sampler: the only difference between the two "
        "images is the text-encode node (upper row: CLIP Text Encode, lower row: LongAlign). CLIP Text Encode "
        "cuts the prompt into 77-token chunks wherever the token count falls; LongAlign encodes whole "
        "sentences.\n\n"
        f"* `models/checkpoints/`: any SD1.5 checkpoint (`{SD15_CHECKPOINT}`).\n"
        "* Both KSamplers use seed 1234, *fixed*: change both to compare another seed.",
        (LOADERS_X, band_y + 98 + 60), (360, 300))
    return wf
