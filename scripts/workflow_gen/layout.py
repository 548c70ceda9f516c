"""Where nodes go, and the pieces several workflows reuse (encoder pair, sampler, decoder, text to image).

The text-to-image workflows share four columns (x of a node's left edge, in graph pixels): the loaders,
prompt and note (:data:`LOADERS_X`), the text encoders and the latent (:data:`ENCODERS_X`), the segment report
and the sampler (:data:`SAMPLERS_X`), the decoder and the Denscore loader (:data:`DECODERS_X`); the outputs
come after. A node's pos is the top-left of its body; its 30 px title bar sits above it. Links are splines
that leave an output to the right and enter an input from the left, so a link that crosses a column must stay
in a free band of it: the checkpoint's MODEL and VAE links run through a corridor between the positive and the
negative encoder, the VAE link passes above the sampler, and no link runs behind a node
(tests/test_workflows.py computes it).
"""

from __future__ import annotations

from .content import NEGATIVE_PROMPT
from .graph import Node, Workflow

LOADERS_X, ENCODERS_X, SAMPLERS_X, DECODERS_X = 20, 440, 960, 1460
TOP = 60  # the y of the first row's bodies
CHECKPOINT_Y = 400  # the checkpoint loader; its MODEL / CLIP / VAE outputs are at y + 14 / 34 / 54
ENCODER_W = 420

#: Colours ComfyUI's own templates use for positive / negative prompt nodes.
GREEN = {"color": "#232", "bgcolor": "#353"}
RED = {"color": "#322", "bgcolor": "#533"}

LONGALIGN_WIDGETS = dict(token_budget=240, overflow="extend", split_mode="sentence", long_sentences="split")
SAMPLER_SIZE = (320, 262)


def encode_pair(wf: Workflow, clip, positive: str, negative: str, pos_y: float, neg_y: float, t5=None,
                pos_h: float = 300, x: float = ENCODERS_X):
    """A positive and a negative LongAlign Text Encode, one above the other, sharing one CLIP (and T5 branch)."""
    pos = wf.add("LongAlignTextEncode", (x, pos_y), (ENCODER_W, pos_h), title="LongAlign Text Encode (positive)",
                 colors=GREEN, text=positive, **LONGALIGN_WIDGETS)
    neg = wf.add("LongAlignTextEncode", (x, neg_y), (ENCODER_W, 244), title="LongAlign Text Encode (negative)",
                 colors=RED, text=negative, **LONGALIGN_WIDGETS)
    for node in (pos, neg):
        wf.link(clip, node, "clip")
        if t5 is not None:
            wf.link(t5, node, "longalign_t5")
    return pos, neg


def sample(wf: Workflow, model, pos, neg, latent, x: float, y: float, seed: int, steps: int, cfg: float,
           sampler: str, scheduler: str, title: str | None = None) -> Node:
    ks = wf.add("KSampler", (x, y), SAMPLER_SIZE, title=title, seed=seed, control_after_generate="fixed",
                steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=1.0)
    wf.link(model, ks, "model")
    wf.link(pos, ks, "positive")
    wf.link(neg, ks, "negative")
    wf.link(latent, ks, "latent_image")
    return ks


def decode(wf: Workflow, ks, vae, x: float, y: float) -> Node:
    dec = wf.add("VAEDecode", (x, y), (210, 46))
    wf.link(ks.out("LATENT"), dec, "samples")
    wf.link(vae, dec, "vae")
    return dec


def text_to_image(wf: Workflow, checkpoint: str, prompt: str, size: int, seed: int, steps: int, cfg: float,
                  sampler: str, scheduler: str, prefix: str, saved: str, model=None, t5=None, ckpt=None,
                  neg_y: float = 570, sampler_y: float = 520):
    """checkpoint -> LongAlign positive/negative -> KSampler -> VAE Decode -> Save Image, with the positive
    prompt's segment report in Preview as Text right next to it."""
    ckpt = ckpt or wf.add("CheckpointLoaderSimple", (LOADERS_X, CHECKPOINT_Y), (360, 98), ckpt_name=checkpoint)
    pos, neg = encode_pair(wf, ckpt.out("CLIP"), prompt, NEGATIVE_PROMPT, TOP, neg_y, t5=t5)
    latent = wf.add("EmptyLatentImage", (ENCODERS_X, neg_y + 244 + 60), (ENCODER_W, 106), width=size, height=size,
                    batch_size=1)
    report = wf.add("PreviewAny", (SAMPLERS_X, TOP), (ENCODER_W, 340), title="Preview as Text (segment report)")
    wf.link(pos.out("report"), report, "source")
    ks = sample(wf, model or ckpt.out("MODEL"), pos.out("CONDITIONING"), neg.out("CONDITIONING"),
                latent.out("LATENT"), SAMPLERS_X, sampler_y, seed=seed, steps=steps, cfg=cfg, sampler=sampler,
                scheduler=scheduler)
    dec = decode(wf, ks, ckpt.out("VAE"), DECODERS_X, CHECKPOINT_Y + 20)  # vae input level with the ckpt's VAE
    save = wf.add("SaveImage", (DECODERS_X + 210 + 100, TOP), (512, 560), title=f"Save Image ({saved})",
                  filename_prefix=prefix)
    wf.link(dec.out("IMAGE"), save, "images")
    return ckpt, pos
