"""Messages for a loader whose model file or folder is missing, in the words a ComfyUI user needs: which node,
which option, what was asked for, which folder was searched, and where the released file comes from.

The loader nodes return this from ``validate_inputs``, so ComfyUI reports it when the prompt is queued (before
anything runs) instead of its generic "value not in list", which names the node's class id.
"""

from __future__ import annotations

from typing import Sequence

#: Where each loader's files go (under ComfyUI's models/ folder) and where the released ones come from.
SOURCES = {
    "loras": "the LongSD release, huggingface.co/luping-liu/LongSD (s28750_lora_vis.pt, sd15-reward-3750.pt)",
    "text_encoders": "huggingface.co/google-t5/t5-large: config.json, model.safetensors and the tokenizer files, "
                     "together in one folder (e.g. t5-large/)",
    "longalign": "the LongSD release, huggingface.co/luping-liu/LongSD (the s28750_adapter folder)",
    "denscore": "huggingface.co/luping-liu/Denscore (the folder with config.json and model.safetensors); "
                "PickScore or CLIP-H folders and the HPSv2 .pt work too",
}


def missing_model_message(node: str, option: str, value: object, folder: str, available: Sequence[str]) -> str | bool:
    """True when ``value`` is one of ``available``; otherwise one paragraph saying what is missing and the fix.

    ``node`` is the display name, ``folder`` the models/ sub-folder searched (a key of :data:`SOURCES`).
    """
    if isinstance(value, str) and value in available:
        return True
    shown = ", ".join(list(available)[:5]) + (" …" if len(available) > 5 else "")
    found = f"it holds: {shown}" if available else "it is empty or does not exist yet"
    return (f"{node}: {option} {value!r} is not in ComfyUI/models/{folder}/ ({found}). Get it from "
            f"{SOURCES.get(folder, 'its release')}, put it in models/{folder}/, then press R in ComfyUI to refresh "
            f"the lists (or pick another entry).")
