"""LongAlign trainer (``python -m trainer.finetune``): composes ``longalign_core`` with diffusers, peft and
accelerate. Imports no ComfyUI module."""
