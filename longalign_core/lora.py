"""LongAlign UNet LoRAs: the released LongSD ``.pt`` format, kohya-style safetensors, and merging (docs/method.md §3).

A LongSD LoRA ``.pt`` is ``torch.save`` of a plain list ``[up_0, down_0, up_1, down_1, …]`` (fp16, rank 32,
scale 1), with no names. The order is the reference trainer's traversal of a diffusers ``UNet2DConditionModel``:
walk ``unet.modules()``; for each module whose class is ``ResnetBlock2D``, ``Attention`` (older diffusers:
``CrossAttention``) or ``GEGLU``, take every ``nn.Linear`` / ``nn.Conv2d`` inside it in ``named_modules()`` order.
:func:`lora_targets` derives that order from a UNet config (SD1.5: 224 modules), so any UNet of the family works,
including tiny test ones. ΔW = up @ down (convolutions: ``(up.flatten(1) @ down.flatten(1)).reshape(W.shape)``).

ComfyUI's stock LoRA loader reads kohya keys ``lora_unet_<diffusers path with _>.lora_up/.lora_down/.alpha``;
:func:`to_kohya` writes them with ``alpha = rank`` so the scale stays 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .dtypes import DTYPES
from .errors import BadConfigError, BadModelFileError

#: Module classes whose Linear/Conv2d layers carry a LongAlign LoRA (reference ``UNET_EXTENDED_TARGET_REPLACE``).
LORA_TARGET_CLASSES = ("ResnetBlock2D", "Attention", "CrossAttention", "GEGLU")
KOHYA_PREFIX = "lora_unet_"
SD15_UNET_CONFIG = Path(__file__).with_name("data") / "sd15_unet_config.json"
#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json.
SDXL_UNET_CONFIG = Path(__file__).with_name("data") / "sdxl_unet_config.json"
#: The published UNet configs by name (``load_unet_config("sdxl")``).
PUBLISHED_UNET_CONFIGS = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}


class LoraFormatError(BadModelFileError):
    """A LoRA file does not match the expected format or the UNet it is applied to."""


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-carrying layer: diffusers module path, ``"linear"`` or ``"conv"``, and its weight shape."""

    path: str
    kind: str
    weight_shape: tuple[int, ...]

    @property
    def kohya_name(self) -> str:
        return KOHYA_PREFIX + self.path.replace(".", "_")


def load_unet_config(config: str | Path | Mapping | None = None) -> dict:
    """A diffusers UNet config: a dict, a ``config.json`` path, a diffusers model folder (``unet/`` inside or
    not), a published one by name (``"sd15"``, ``"sdxl"``: SDXL base), or None for Stable Diffusion 1.5."""
    if config is None:
        config = SD15_UNET_CONFIG
    elif isinstance(config, str) and config in PUBLISHED_UNET_CONFIGS:
        config = PUBLISHED_UNET_CONFIGS[config]
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    for candidate in (path, path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            from .errors import read_text_file

            try:
                loaded = json.loads(read_text_file(candidate, "UNet config"))
            except json.JSONDecodeError as exc:
                raise BadConfigError(f"{candidate}:{exc.lineno}: not valid JSON ({exc.msg}); give a diffusers "
                                     f"UNet config.json") from None
            if not isinstance(loaded, dict) or "block_out_channels" not in loaded:
                raise BadConfigError(f"{candidate} is not a diffusers UNet config (no 'block_out_channels'); give "
                                     f"the unet/config.json of the base model, or its folder")
            return loaded
    raise BadConfigError(f"no UNet config.json at {path} (nor in its unet/ folder)")


#: SDXL's pooled text (1280) + 6 (base) or 5 (refiner) size/crop/score embeddings of 256 channels each.
SDXL_TIME_EMBED_DIM = 256
SDXL_ADM_CHANNELS = (1280 + 6 * SDXL_TIME_EMBED_DIM, 1280 + 5 * SDXL_TIME_EMBED_DIM)


def diffusers_config_from_ldm(unet_config: Mapping) -> dict:
    """A diffusers ``UNet2DConditionModel`` config from an LDM/ComfyUI UNet config (``model_channels``,
    ``channel_mult``, ``num_res_blocks``, ``transformer_depth``, ``transformer_depth_output``,
    ``transformer_depth_middle``, ``context_dim``, …) of the SD1.x/SD2.x and SDXL families (SDXL: the extra
    ``text_time`` conditioning of ``adm_in_channels``). Transformer depths are per block: up blocks that differ
    from the down blocks (distilled SDXLs such as SSD-1B) get diffusers' ``reverse_transformer_layers_per_block``.
    A layout diffusers cannot build is a :class:`LoraFormatError` that says why."""
    extra = {}
    adm = unet_config.get("adm_in_channels")
    if adm:
        if adm not in SDXL_ADM_CHANNELS:
            raise LoraFormatError(f"LongAlign LoRAs are for SD1.x/SD2.x and SDXL UNets; this model's extra "
                                  f"conditioning ({adm} channels) is neither")
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
                 "projection_class_embeddings_input_dim": adm}
    mc, mult = unet_config["model_channels"], list(unet_config["channel_mult"])
    nrb = unet_config["num_res_blocks"]
    nrb = list(nrb) if isinstance(nrb, (list, tuple)) else [nrb] * len(mult)
    if len(set(nrb)) != 1:
        raise LoraFormatError(f"this UNet has {nrb} res blocks per level; diffusers (whose layer names LongAlign "
                              f"LoRAs use) needs the same number on every level")
    n, levels = nrb[0], len(mult)
    depth = list(unet_config.get("transformer_depth", [1] * (n * levels)))
    down = [depth[i * n:(i + 1) * n] for i in range(levels)]
    output = unet_config.get("transformer_depth_output")
    # ComfyUI builds output blocks deepest level first, taking their depths from the end of the list
    up = [list(reversed(output))[i * (n + 1):(i + 1) * (n + 1)] for i in range(levels)] if output else \
        [[max(d)] * (n + 1) for d in reversed(down)]
    for blocks, what in ((down, "input"), (up, "output")):
        if any(0 in d and any(d) for d in blocks):
            raise LoraFormatError(f"this UNet mixes blocks with and without attention within one level ({what} "
                                  f"depths {blocks}); diffusers cannot build that")
    per_level = [max(1, d[0]) if len(set(d)) == 1 else list(d) for d in down]
    built_up = [[r] * (n + 1) if isinstance(r, int) else None for r in reversed(per_level)]
    reverse = {}
    if any(any(d) and list(d) != b for d, b in zip(up, built_up)):
        reverse = {"reverse_transformer_layers_per_block": [list(d) if any(d) else [1] * (n + 1) for d in up]}
    mid = unet_config.get("transformer_depth_middle", 1)
    last = per_level[-1][0] if isinstance(per_level[-1], list) else per_level[-1]
    if mid is not None and mid >= 1 and mid != last:
        raise LoraFormatError(f"this UNet's middle block has {mid} transformer blocks but its last level {last}; "
                              f"diffusers builds the middle block with the last level's depth")
    channels = [mc * m for m in mult]
    heads = unet_config.get("num_heads", -1)
    head_dim = heads if heads and heads > 0 else [c // unet_config["num_head_channels"] for c in channels]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": unet_config.get("in_channels", 4), "out_channels": unet_config.get("out_channels", 4),
        "block_out_channels": channels, "layers_per_block": n,
        "down_block_types": ["CrossAttnDownBlock2D" if any(d) else "DownBlock2D" for d in down],
        "up_block_types": ["CrossAttnUpBlock2D" if any(d) else "UpBlock2D" for d in up],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid is not None and mid >= 1 else None,
        "transformer_layers_per_block": per_level, **reverse,
        "cross_attention_dim": unet_config["context_dim"], "attention_head_dim": head_dim,
        "use_linear_projection": bool(unet_config.get("use_linear_in_transformer", False)),
        "norm_num_groups": 32,
        **extra,
    }


def lora_targets(unet: nn.Module | str | Path | Mapping | None = None) -> list[LoraTarget]:
    """The LongSD LoRA module order of a UNet (a module, or a config → built on the meta device, no weights)."""
    if not isinstance(unet, nn.Module):
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(load_unet_config(unet))
    names = {id(m): n for n, m in unet.named_modules()}
    targets = []
    for module in unet.modules():
        if type(module).__name__ not in LORA_TARGET_CLASSES:
            continue
        base = names[id(module)]
        for sub, layer in module.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
                targets.append(LoraTarget(f"{base}.{sub}", kind, tuple(layer.weight.shape)))
    return targets


def _pair_rank(up: torch.Tensor, down: torch.Tensor, file_rank: int | None) -> int | None:
    """The rank a pair should have: the one its two tensors agree on, else the file's usual rank."""
    up_rank = up.shape[1] if up.ndim >= 2 else None
    down_rank = down.shape[0] if down.ndim >= 1 else None
    if up_rank is not None and up_rank == down_rank:
        return up_rank
    return file_rank if file_rank is not None else (down_rank or up_rank)


def _check_pair(k: int, target: LoraTarget, up: torch.Tensor, down: torch.Tensor, file_rank: int | None = None
                ) -> None:
    """Shapes of pair ``k`` against the layer it targets: ``up (out, r[, 1, 1])``, ``down (r, in[, kh, kw])``.
    The expected shapes come from the layer's weight and the rank both tensors (or the rest of the file) agree
    on, not from the possibly broken tensor itself."""
    out_ch, in_ch = target.weight_shape[0], target.weight_shape[1]
    kernel = target.weight_shape[2:]
    rank = _pair_rank(up, down, file_rank)
    expected_up = (out_ch, rank) + ((1, 1) if target.kind == "conv" else ())
    expected_down = (rank, in_ch) + kernel
    if tuple(up.shape) != expected_up or tuple(down.shape) != expected_down:
        swapped = tuple(down.shape) == expected_up and tuple(up.shape) == expected_down
        raise LoraFormatError(
            f"LoRA pair {k} ({target.path}, {target.kind} weight {list(target.weight_shape)}, rank {rank}): "
            f"expected up {list(expected_up)} and down {list(expected_down)}, found up {list(up.shape)} and down "
            f"{list(down.shape)}. "
            + ("up and down are swapped: the file's order must be [up_0, down_0, up_1, down_1, …]" if swapped
               else "Is this LoRA for another base model?"))


def _usual_rank(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int | None:
    """The most common rank among pairs whose up and down agree (the file's rank)."""
    from collections import Counter

    ranks = Counter(up.shape[1] for up, down in pairs
                    if up.ndim >= 2 and down.ndim >= 1 and up.shape[1] == down.shape[0])
    return ranks.most_common(1)[0][0] if ranks else None


def read_longsd_lora(path: str | Path, targets: list[LoraTarget]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read a LongSD ``.pt`` (list of up/down tensors) safely and name its pairs by diffusers path.

    Validates the count and every shape against ``targets``; never unpickles code (``weights_only=True``).
    """
    from .io_utils import CheckpointError, safe_torch_load

    try:
        tensors = safe_torch_load(path, "LoRA file")
    except CheckpointError as exc:
        raise LoraFormatError(str(exc)) from None
    if isinstance(tensors, tuple):
        tensors = list(tensors)
    if not isinstance(tensors, list) or not all(torch.is_tensor(t) for t in tensors):
        kind = type(tensors).__name__
        raise LoraFormatError(f"{path} holds a {kind}, not the LongSD list of LoRA tensors [up_0, down_0, …]"
                              + (" (a dict: use the .safetensors/kohya loader)" if kind == "dict" else ""))
    if len(tensors) != 2 * len(targets):
        raise LoraFormatError(f"{path} has {len(tensors)} tensors ({len(tensors) / 2:g} up/down pairs) but the UNet "
                              f"has {len(targets)} LoRA targets ({2 * len(targets)} tensors expected). Is this a "
                              f"LongSD LoRA for this base model?")
    raw = [(tensors[2 * k], tensors[2 * k + 1]) for k in range(len(targets))]
    file_rank = _usual_rank(raw)
    pairs = {}
    for k, (target, (up, down)) in enumerate(zip(targets, raw)):
        try:
            _check_pair(k, target, up, down, file_rank)
        except LoraFormatError as exc:
            raise LoraFormatError(f"{path}: {exc}") from None
        pairs[target.path] = (up, down)
    return pairs


def to_kohya(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype | None = None
             ) -> dict[str, torch.Tensor]:
    """kohya-style state dict: ``lora_unet_<path>.lora_up.weight``, ``.lora_down.weight``, ``.alpha`` = rank."""
    out = {}
    for path, (up, down) in pairs.items():
        name = KOHYA_PREFIX + path.replace(".", "_")
        for part, t in (("up", up), ("down", down)):
            _check_representable(t, dtype, f"{path} ({part})")
        out[f"{name}.lora_up.weight"] = (up if dtype is None else up.to(dtype)).contiguous()
        out[f"{name}.lora_down.weight"] = (down if dtype is None else down.to(dtype)).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def _check_representable(t: torch.Tensor, dtype: torch.dtype | None, what: str) -> None:
    """Refuse to write a tensor whose values are not finite, or would not be after the cast to ``dtype``
    (fp16 overflows to inf above 65504): a silently broken LoRA is worse than none."""
    if not t.is_floating_point():
        return
    biggest = float(t.detach().abs().max()) if t.numel() else 0.0
    if not math.isfinite(biggest):
        raise LoraFormatError(f"LoRA layer {what} holds NaN or infinite values; the LoRA is broken (a diverged "
                              f"training run?), nothing was written")
    if dtype is not None and dtype.is_floating_point and biggest > torch.finfo(dtype).max:
        raise LoraFormatError(f"LoRA layer {what} has values up to {biggest:.4g}, beyond "
                              f"{str(dtype).removeprefix('torch.')}'s largest {torch.finfo(dtype).max:.4g}: they "
                              f"would become inf. Keep more range: --dtype fp32 (or bf16)")


def from_kohya(state: Mapping[str, torch.Tensor], targets: list[LoraTarget]
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Named (up, down) pairs from a kohya-style state dict, with ``alpha/rank`` folded into ``up``. Keys that
    match no target are an error naming them (a LoRA for another model, or for the text encoder)."""
    by_name = {t.kohya_name: t for t in targets}
    pairs, seen = {}, set()
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        if name not in by_name:
            continue
        target = by_name[name]
        up, down = state.get(f"{name}.lora_up.weight"), state[key]
        if up is None:
            raise LoraFormatError(f"{name}: lora_down without lora_up")
        _check_pair(len(pairs), target, up, down)
        rank = down.shape[0]
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(rank)
        pairs[target.path] = (up * (alpha / rank) if alpha != rank else up, down)
        seen.update({key, f"{name}.lora_up.weight", f"{name}.alpha"})
    unused = sorted(set(state) - seen)
    if unused:
        raise LoraFormatError(f"{len(unused)} LoRA keys match no LongAlign UNet layer of this model (e.g. "
                              f"{unused[:3]}); this is not a LongAlign LoRA for this base model. Load other LoRAs "
                              f"with ComfyUI's Load LoRA node")
    if not pairs:
        raise LoraFormatError("no UNet LoRA keys (lora_unet_…lora_down.weight) found")
    return pairs


def load_lora(path: str | Path, targets: list[LoraTarget]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A LongSD ``.pt``/``.bin`` list, or a kohya ``.safetensors`` (converted files, this trainer's output)."""
    from .errors import check_input_file, read_safetensors

    path = check_input_file(path, "LoRA file", error=LoraFormatError)
    if path.suffix.lower() == ".safetensors":
        state, _ = read_safetensors(path, "LoRA file", error=LoraFormatError)
        try:
            return from_kohya(state, targets)
        except LoraFormatError as exc:
            raise LoraFormatError(f"{path}: {exc}") from None
    return read_longsd_lora(path, targets)


def lora_delta(up: torch.Tensor, down: torch.Tensor, weight_shape) -> torch.Tensor:
    """ΔW = up @ down, flattened for convolutions and reshaped to the weight."""
    return (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight_shape)


@torch.no_grad()
def merge_lora(unet: nn.Module, pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               strength: float = 1.0) -> int:
    """Add ``strength · ΔW`` to every targeted weight of a diffusers UNet in place; returns the layer count.
    Stack files by calling it once per file (stage-1 then reward LoRA = the reference's sequential merge)."""
    modules = dict(unet.named_modules())
    for path, (up, down) in pairs.items():
        layer = modules.get(path)
        if layer is None:
            raise LoraFormatError(f"the UNet has no layer {path}")
        w = layer.weight  # the sum in fp32, rounded once to the weight's dtype (bf16/fp16 frozen weights)
        w.copy_((w.float() + strength * lora_delta(up, down, w.shape).to(w.device)).to(w.dtype))
    return len(pairs)


def save_kohya(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path,
               metadata: Mapping[str, str] | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write a kohya-style ``.safetensors`` atomically (never a half-written file)."""
    from safetensors.torch import save_file

    from .io_utils import atomic_path

    with atomic_path(path) as tmp:
        save_file(to_kohya(pairs, dtype), tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)




def main(argv: list[str] | None = None) -> int:
    """``python -m longalign_core.lora IN.pt OUT.safetensors``: convert a LongSD LoRA for ComfyUI's LoraLoader."""
    import argparse

    from .errors import check_input_file, check_output_path

    ap = argparse.ArgumentParser(prog="python -m longalign_core.lora", description=main.__doc__)
    ap.add_argument("src", help="LongSD LoRA .pt (list of tensors), e.g. sd15-reward-3750.pt")
    ap.add_argument("dst", help="output .safetensors (kohya keys; put it in ComfyUI/models/loras)")
    ap.add_argument("--unet-config", help="diffusers UNet config.json or model folder (default: SD1.5)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp16",
                    help="dtype of the written tensors (default fp16, as released; fp32 keeps values beyond 65504)")
    args = ap.parse_args(argv)
    src = check_input_file(args.src, "LoRA file", error=LoraFormatError)
    if src.suffix.lower() == ".safetensors":
        raise BadConfigError(f"{src} is already a .safetensors file; ComfyUI's Load LoRA and this pack's Load "
                             f"LongSD LoRA read it as is (this converter takes a LongSD .pt)")
    dst = check_output_path(args.dst, "dst")
    if dst.suffix.lower() != ".safetensors":
        raise BadConfigError(f"dst {dst} must end in .safetensors (ComfyUI lists LoRAs by extension)")
    targets = lora_targets(args.unet_config)
    pairs = read_longsd_lora(src, targets)
    rank = next(iter(pairs.values()))[1].shape[0]
    save_kohya(pairs, dst, {"format": "kohya", "source": src.name, "rank": rank, "ss_network_dim": rank,
                            "ss_network_alpha": rank, "longalign": "longsd-lora"}, dtype=DTYPES[args.dtype])
    print(f"wrote {dst}: {len(pairs)} LoRA layers, rank {rank}, scale 1, {args.dtype}")
    return 0


if __name__ == "__main__":
    from .errors import run_cli

    raise SystemExit(run_cli(main, prog="python -m longalign_core.lora"))
