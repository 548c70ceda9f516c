"""LongAlign trainer (``python -m trainer.finetune``): composes ``longalign_core`` with diffusers, peft and
accelerate. Imports no ComfyUI module."""

import os

# Intel MKL (torch's CPU BLAS) may give different last bits for the same matrices at different memory alignments,
# so two processes (a resumed run, torchrun's ranks, the ComfyUI node's child) could score the same image
# differently. Its conditional numerical reproducibility mode removes that; set before torch first calls MKL
# (this package's entry points import torch after this line). A value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
