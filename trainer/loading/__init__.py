"""Loading the base model (SD1.x / SDXL: diffusers folders, Hub ids, single-file checkpoints, the built-in tiny
models) and the preference model's source: ``models`` is the entry point; ``base_model`` is what it returns,
``single_file`` and ``checkpoint_configs`` read ComfyUI-style checkpoints, ``embedded`` builds the tiny models."""
