"""Stand-in models for the tests and the benchmarks: the real architectures and configs with random weights,
written in the real file layouts (a single-file SD/SDXL checkpoint, a ComfyUI ``CLIP`` object), so nothing is
downloaded. Development only: not installed with the pack (``.comfyignore``) nor by ``pip install``.

- :mod:`standins.single_file`: diffusers / transformers weights renamed to the original SD and SDXL single-file
  layouts (``model.diffusion_model.*``, ``first_stage_model.*``, CLIP-L and OpenCLIP-bigG).
- :mod:`standins.comfy_host`: the ComfyUI checkout at ``COMFYUI_PATH`` imported as ComfyUI would, this pack
  loaded as a custom node, and ComfyUI ``CLIP`` objects with random full-size weights.
"""
