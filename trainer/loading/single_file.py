"""Single-file checkpoints (what ComfyUI users have in ``models/checkpoints``) loaded offline through diffusers'
single-file loader, with the configs it needs generated from the checkpoint's own tensor shapes
(:mod:`trainer.loading.checkpoint_configs`).

Two families are read: SD1.x (CLIP-L under ``cond_stage_model.transformer``) and SDXL base with the models
built on it (Pony, Illustrious, NoobAI: the same architecture; CLIP-L in Hugging Face layout under
``conditioner.embedders.0.transformer`` and OpenCLIP-bigG in open_clip layout under
``conditioner.embedders.1.model``). The family is decided from the tensor names and shapes alone (a safetensors
header, or a ``.ckpt`` read with ``weights_only=True``), so a wrong file is refused before anything is built."""

from __future__ import annotations

import os
from pathlib import Path

from longalign_core.checkpoint_family import FAMILY_NAMES, checkpoint_family, safetensors_shapes
from longalign_core.errors import BadModelFileError

from .base_model import BaseModel
from .checkpoint_configs import SUPPORTED, UNET, Family, Shapes, config_dir_for

# --------------------------------------------------------------------------------------------------------------
# reading names and shapes only
# --------------------------------------------------------------------------------------------------------------


def read_checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a single-file checkpoint, without loading its weights where the format allows:
    a safetensors header, or a ``.ckpt``/``.pt`` read with ``weights_only=True`` (memory-mapped when it can be),
    so no code from the file is ever run. A missing, empty, corrupt or code-carrying file is a
    :class:`BadModelFileError` naming it."""
    from longalign_core.errors import check_input_file

    path = check_input_file(path, "checkpoint", error=BadModelFileError)
    with open(path, "rb") as handle:
        head = handle.read(16)
    is_zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if path.suffix.lower() in (".safetensors", ".sft") or not is_zip_or_pickle:
        return safetensors_shapes(path)
    return _torch_shapes(path)


def checkpoint_weight_dtype(path: str | os.PathLike):
    """The dtype most of a checkpoint's UNet weights are stored in (from the safetensors header, or the
    memory-mapped ``.ckpt``), or None when it cannot be told."""
    from collections import Counter

    import torch

    from longalign_core.dtype_loading import SAFETENSORS_DTYPES

    counts: Counter = Counter()
    try:
        if Path(path).suffix.lower() in (".safetensors", ".sft"):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                for k in handle.keys():
                    if k.startswith(UNET):
                        counts[SAFETENSORS_DTYPES.get(handle.get_slice(k).get_dtype())] += 1
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            counts.update(v.dtype for k, v in state.items() if k.startswith(UNET) and torch.is_tensor(v))
    except Exception:  # noqa: BLE001 — only a hint: the loader reports a bad file itself
        return None
    counts.pop(None, None)
    return counts.most_common(1)[0][0] if counts else None


def _torch_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import pickle

    import torch

    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        if "weights only" in str(exc).lower():
            raise BadModelFileError(
                f"checkpoint {path} contains pickled Python objects other than tensors, so it was not loaded "
                f"(loading it could run code). Use the model's .safetensors download, or convert the .ckpt once "
                f"in a trusted environment. ({first})") from None
        raise BadModelFileError(f"checkpoint {path} is not a PyTorch or safetensors checkpoint ({first}); "
                                f"give the model's .safetensors or .ckpt file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt: "
                                f"{detail}); download or export it again") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadModelFileError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of named "
                                f"tensors; {SUPPORTED}")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}


# --------------------------------------------------------------------------------------------------------------
# which family
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------


def _parts_cast_as_read(path, shapes: Shapes, family: Family, config, dtype) -> dict:
    """The UNet and the text encoder(s) of a safetensors checkpoint, read a chunk at a time in ``dtype``
    (:func:`longalign_core.dtype_loading.read_cast`) and converted by diffusers' single-file code, as pipeline
    components for ``from_single_file``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from longalign_core.dtype_loading import read_cast

    where = dict(config=str(config), local_files_only=True, torch_dtype=dtype)
    weights = dict(read_cast(path, dtype, [k for k in shapes if k.startswith(UNET)]))
    parts = {"unet": UNet2DConditionModel.from_single_file(weights, subfolder="unet", **where)}
    weights = dict(read_cast(path, dtype, [k for k in shapes if k.startswith(("cond_stage_model.", "conditioner."))]))
    parts["text_encoder"] = create_diffusers_clip_model_from_ldm(CLIPTextModel, weights, "text_encoder", **where)
    if family == "sdxl":
        parts["text_encoder_2"] = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, weights,
                                                                       "text_encoder_2", **where)
    return parts


def load_single_file(path: str | os.PathLike, dtype=None) -> BaseModel:
    """A single-file SD1.x or SDXL-family checkpoint (what ComfyUI users have), family and configs from its own
    tensor names and shapes, loaded through diffusers' single-file loader offline, directly in ``dtype`` (default
    fp32; the UNet and text encoders of a safetensors file stored in another dtype are cast as they are read,
    never held twice); the VAE in :func:`~trainer.sampling.vae_dtype` (fp32 for SDXL's in an fp16 run, read again
    from the file in fp32). SDXL gives a :class:`BaseModel` with ``text_encoder_2``/``tokenizer_2`` set. The noise
    scheduler is DDPM with the family's betas (what training samples noise with); a v-prediction SDXL file
    (``v_pred`` marker) gives ``prediction_type="v_prediction"`` (and zero terminal SNR with ``ztsnr``) in its
    config."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..sampling import vae_dtype

    dtype = dtype or torch.float32
    shapes = read_checkpoint_shapes(path)
    family = checkpoint_family(shapes, path)
    config = config_dir_for(shapes, family, path)
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    # A safetensors file stored in another dtype: the UNet and the text encoders are read a chunk at a time and
    # cast as they are read, so the stored and the cast copy are never both in memory; the VAE (2 % of the
    # weights) of a 16-bit file is read as stored and cast afterwards.
    stored = checkpoint_weight_dtype(path)
    half = (torch.float16, torch.bfloat16)
    read_as = stored if stored in half and dtype in half else dtype
    try:
        if stored is not None and stored != dtype and Path(path).suffix.lower() in (".safetensors", ".sft"):
            extra.update(_parts_cast_as_read(path, shapes, family, config, dtype))
        pipe = pipeline_cls.from_single_file(str(path), config=str(config), local_files_only=True,
                                             torch_dtype=read_as, **extra)
        vae = pipe.vae
        wanted = vae_dtype(dtype, vae.config)
        if wanted != dtype:  # the fp32 VAE of an fp16 SDXL run: its own weights again, not the fp16 copy upcast
            vae = AutoencoderKL.from_single_file(str(path), config=str(config), subfolder="vae",
                                                 local_files_only=True, torch_dtype=wanted)
        for part in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                     vae if wanted == dtype else None):
            if part is not None and next(part.parameters()).dtype != dtype:
                part.to(dtype)
    except Exception as exc:  # diffusers raises several kinds for a file it cannot convert
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(f"{path} was detected as an {FAMILY_NAMES[family]} checkpoint "
                                f"but diffusers could not load it ({type(exc).__name__}: {detail}); is the file "
                                f"complete? {SUPPORTED}") from None
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if family == "sdxl":
        return BaseModel(pipe.unet, vae, pipe.text_encoder, pipe.tokenizer, scheduler, str(path),
                         text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
    return BaseModel(pipe.unet, vae, pipe.text_encoder, pipe.tokenizer, scheduler, str(path))
