"""The arms of an evaluation: the base model and each ``--lora FILE[:STRENGTH]``, checked before anything loads,
and the exact swap of an arm's LoRA in and out of the UNet's weights."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from longalign_core.errors import BadConfigError, BadModelFileError, check_input_file

from .stats import BASE_ARM


@dataclass
class Arm:
    """One model under test: the base (no LoRA) or the base with ``lora`` merged at ``strength``."""

    name: str
    lora: str = ""
    strength: float = 0.0
    spec: str = ""  # as given to --lora
    pairs: dict | None = None
    sha256: str = ""


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` -> (file, strength); a ``:`` that is not followed by a number belongs to the path
    (``C:\\loras\\x.safetensors``)."""
    path, _, tail = spec.rpartition(":")
    if path and tail:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan_arms(specs: list[str]) -> list[Arm]:
    """The base plus one arm per ``--lora``; each file is checked now (exists, readable, not empty) and an arm
    given twice (the same file at the same strength) is refused."""
    arms, seen, names = [Arm(BASE_ARM)], {}, {BASE_ARM}
    for spec in specs:
        path, strength = parse_lora_spec(spec)
        if not math.isfinite(strength):
            raise BadConfigError(f"--lora {spec}: the strength must be a finite number")
        if not Path(path).expanduser().exists():
            raise BadModelFileError(f"--lora {spec}: no such LoRA file {path} (a typo in the path?); give this "
                                    f"trainer's .safetensors or a LongSD .pt, optionally with :STRENGTH")
        checked = check_input_file(Path(path).expanduser(), "LoRA file", "--lora", error=BadModelFileError)
        key = (str(checked.resolve()), strength)
        if key in seen:
            raise BadConfigError(f"--lora {spec} is given twice (as {seen[key]!r} too): the same LoRA at the same "
                                 f"strength is one arm. Drop one, or give another strength (FILE:0.5)")
        seen[key] = spec
        stem = checked.stem
        name = f"{stem}@{strength:g}"
        k = 2
        while name in names:  # two files with one name in different folders
            name = f"{stem}-{k}@{strength:g}"
            k += 1
        names.add(name)
        arms.append(Arm(name, str(checked), strength, spec))
    return arms


def lora_metadata(path: str) -> dict[str, str]:
    """The metadata of a .safetensors LoRA ({} for a LongSD .pt)."""
    if not path.lower().endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 — load_lora names a broken file; metadata is only advice
        return {}


class WeightSwap:
    """Merges an arm's LoRA into the UNet and restores the base weights exactly afterwards (a copy of every
    touched weight is kept on the CPU), so every arm starts from bit-identical base weights."""

    def __init__(self, unet):
        self.unet, self.modules, self.saved = unet, dict(unet.named_modules()), {}

    def apply(self, arm: Arm) -> None:
        from longalign_core.lora import merge_lora

        self.restore()
        if arm.pairs is None:
            return
        for path in arm.pairs:
            self.saved[path] = self.modules[path].weight.detach().to("cpu", copy=True)
        merge_lora(self.unet, arm.pairs, arm.strength)

    @torch.no_grad()
    def restore(self) -> None:
        for path, weight in self.saved.items():
            self.modules[path].weight.copy_(weight)
        self.saved = {}
