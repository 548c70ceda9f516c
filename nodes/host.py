"""The narrow seam to ComfyUI internals (``comfy.*``): imported only inside a running ComfyUI."""

from __future__ import annotations


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def progress_bar(total: int):
    """ComfyUI's progress bar for the node being executed."""
    import comfy.utils

    return comfy.utils.ProgressBar(total)
