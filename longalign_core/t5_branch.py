"""The T5 branch of the released LongSD model (docs/method.md §2): T5 encoder + LaVi-Bridge text adapter.

The whole prompt (not segmented) goes through ``google-t5/t5-large`` (d_model 1024) padded to 240 tokens with no
attention mask (T5 is bidirectional, so the padding changes the states; the released weights were trained so),
then the adapter ``LayerNorm(1024) → FF1 → LayerNorm(896) → FF2`` maps it to CLIP space (768). Each FF is
GEGLU(``Linear(d, 2·4·d)``, ``x · gelu(gate)``) → Dropout → ``Linear(4·d, out)``. The UNet's cross-attention
context is ``[CLIP segment merge (240×768) | adapter(T5) (240×768)]`` = 480×768.

The adapter is a diffusers ``ModelMixin``/``ConfigMixin``, so it reads and writes the released folder format:
``config.json`` (``in_dim``, ``int_dim``, ``out_dim``) + ``diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .errors import BadConfigError, BadInputError, BadModelFileError

T5AttentionMask = Literal["none", "padding"]
#: Token length of the T5 branch in the released model (reference ``--token_length 240``).
T5_MAX_LENGTH = 240


class _GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: int, mult: int = 4, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(_GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TextAdapter(ModelMixin, ConfigMixin):
    """LaVi-Bridge text adapter: ``(B, T, in_dim)`` T5 states → ``(B, T, out_dim)`` CLIP-space states."""

    @register_to_config
    def __init__(self, in_dim: int = 1024, int_dim: int = 896, out_dim: int = 768):
        super().__init__()
        self.ff1 = _FeedForward(in_dim, int_dim)
        self.ff2 = _FeedForward(int_dim, out_dim)
        self.norm1 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(int_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(self.norm2(self.ff1(self.norm1(x))))


def load_text_adapter(folder: str | Path, device="cpu", dtype=torch.float32) -> TextAdapter:
    """The released adapter folder (``s28750_adapter/``), checked for missing or extra weights."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise BadModelFileError(f"{folder} is not a LongSD adapter folder: config.json is missing (expected "
                                f"config.json + diffusion_pytorch_model.safetensors)")
    from .errors import check_weights_folder

    check_weights_folder(folder, "T5 adapter", "download the adapter folder (s28750_adapter/) again")
    try:
        adapter = TextAdapter.from_pretrained(str(folder), low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(f"could not load the T5 adapter from {folder} ({detail}); download the adapter "
                                f"folder again") from None
    return adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)


class T5Branch:
    """T5 encoder + adapter: ``encode(prompts) -> (B, max_length, out_dim)``.

    ``attention_mask="none"`` reproduces the reference (pads attend and are attended); ``"padding"`` masks them.
    """

    def __init__(self, tokenizer, encoder, adapter: TextAdapter, max_length: int = T5_MAX_LENGTH,
                 attention_mask: T5AttentionMask = "none"):
        if attention_mask not in ("none", "padding"):
            raise BadConfigError(f"attention_mask {attention_mask!r} is not one of ('none', 'padding')")
        if encoder.config.d_model != adapter.config.in_dim:
            raise BadModelFileError(f"T5 d_model {encoder.config.d_model} does not match the adapter's in_dim "
                             f"{adapter.config.in_dim} (LongSD uses t5-large, d_model 1024)")
        self.tokenizer, self.encoder, self.adapter = tokenizer, encoder, adapter
        self.max_length, self.attention_mask = max_length, attention_mask

    @property
    def out_dim(self) -> int:
        return self.adapter.config.out_dim

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    @torch.no_grad()
    def t5_states(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``(B, max_length, d_model)`` T5 encoder states (frozen encoder)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                             return_tensors="pt")
        device = next(self.encoder.parameters()).device
        mask = tok.attention_mask.to(device) if self.attention_mask == "padding" else None
        return self.encoder(input_ids=tok.input_ids.to(device), attention_mask=mask).last_hidden_state

    def adapt(self, states: torch.Tensor) -> torch.Tensor:
        """The adapter on T5 states (with gradients when the adapter is being trained)."""
        return self.adapter(states.to(next(self.adapter.parameters()).dtype))

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``(B, max_length, out_dim)``: the T5 branch's conditioning for ``prompts``."""
        return self.adapt(self.t5_states(prompts))


def load_t5_branch(t5_folder: str | Path, adapter_folder: str | Path, device="cpu", dtype=torch.float32,
                   max_length: int = T5_MAX_LENGTH, attention_mask: T5AttentionMask = "none") -> T5Branch:
    """A :class:`T5Branch` from a local T5 folder (``T5EncoderModel`` weights + tokenizer, e.g. t5-large) and the
    LongSD adapter folder."""
    from transformers import AutoTokenizer, T5EncoderModel

    t5_folder = Path(t5_folder)
    if not (t5_folder / "config.json").is_file():
        raise BadModelFileError(f"{t5_folder} is not a T5 model folder (config.json missing); download "
                                f"google-t5/t5-large with its tokenizer files")
    from .errors import check_weights_folder

    check_weights_folder(t5_folder, "T5 encoder", "download google-t5/t5-large again")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(t5_folder))
        encoder = T5EncoderModel.from_pretrained(str(t5_folder)).to(device=device, dtype=dtype).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(f"could not load the T5 encoder from {t5_folder} ({detail}); it needs config.json, "
                                f"the weights and the tokenizer files of google-t5/t5-large") from None
    encoder.requires_grad_(False)
    return T5Branch(tokenizer, encoder, load_text_adapter(adapter_folder, device, dtype), max_length, attention_mask)


def combine_conditioning(clip_cond: torch.Tensor, t5_cond: torch.Tensor) -> torch.Tensor:
    """``[CLIP segment merge | adapter(T5)]`` on the token axis: ``(B, L, C)`` + ``(B, T, C)`` → ``(B, L+T, C)``."""
    if clip_cond.shape[0] != t5_cond.shape[0] or clip_cond.shape[-1] != t5_cond.shape[-1]:
        raise BadInputError(f"CLIP conditioning {tuple(clip_cond.shape)} and T5 conditioning {tuple(t5_cond.shape)} "
                         f"differ in batch or channels (the LongSD adapter outputs 768 channels: SD1.x only)")
    return torch.cat([clip_cond, t5_cond.to(clip_cond)], dim=1)
