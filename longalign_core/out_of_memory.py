"""Whether an exception is an allocation failure: running out of memory is a setting to change (the trainer) or a
transient state to step around (the node's trimmed CLIP forward), never a bug or an unsupported model."""

from __future__ import annotations

import torch

#: What each allocator says when it fails, in the RuntimeError it raises: CUDA/ROCm/XPU/MPS ("CUDA out of
#: memory", "CUDA error: out of memory", "MPS backend out of memory") and torch's CPU allocator
#: ("DefaultCPUAllocator: can't allocate memory").
OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a GPU or CPU allocation failure: ``torch.OutOfMemoryError``, Python's ``MemoryError`` (numpy, PIL),
    or a ``RuntimeError`` (``torch.AcceleratorError`` included) whose message is an allocator's (see
    :data:`OUT_OF_MEMORY_WORDS`). Any other exception is not, whatever its message says."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in text for words in OUT_OF_MEMORY_WORDS)
