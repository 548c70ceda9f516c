"""Stand-in models for the tests and the benchmarks: the real architectures and configs with random weights,
written in the real file layouts (a single-file SD/SDXL checkpoint, a ComfyUI ``CLIP`` object), so nothing is
downloaded. Development only: not installed with the pack (``.comfyignore``) nor by ``pip install``.

- :mod:`standins.single_file`: diffusers / transformers weights renamed to the original SD and SDXL single-file
  layouts (``model.diffusion_model.*``, ``first_stage_model.*``, CLIP-L and OpenCLIP-bigG).
- :mod:`standins.comfy_host`: the ComfyUI checkout at ``COMFYUI_PATH`` imported as ComfyUI would, this pack
  loaded as a custom node, and ComfyUI ``CLIP`` objects with random full-size weights.
- :mod:`standins.comfy_checkpoints`: single-file checkpoints ComfyUI detects as SD1.5 and SDXL, shapes from
  ComfyUI's own modules.
- :mod:`standins.comfy_server`: the pack installed into a ``custom_nodes/`` folder and a headless ComfyUI server
  on 127.0.0.1 (start, queue a prompt and wait, stop).
- :mod:`standins.tiny_clip`: tiny CLIP text and two-tower configs with the real vocabulary and token ids.

Nothing here imports pytest: the tests' skips, markers and ``pytest.fail`` stay in ``tests/comfy_support.py``.
"""
