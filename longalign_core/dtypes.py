"""The one table of precision names (what options and CLIs accept) and the torch dtypes they mean."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: What the loader nodes offer: "auto" (the host's choice for the device) or one of DTYPES.
PRECISIONS: tuple[str, ...] = ("auto", *DTYPES)


def dtype_from_name(name: str) -> torch.dtype:
    """``"fp32"`` → ``torch.float32`` etc.; the error names the value and the allowed ones."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"precision {name!r} is not one of {tuple(DTYPES)}") from None
