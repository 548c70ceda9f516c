"""The whole LongAlign loop in ComfyUI: will it fit, train, evaluate, and the LoRA against its base model."""

from __future__ import annotations

from .graph import Workflow
