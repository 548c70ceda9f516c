"""The narrow seam to ComfyUI internals (``comfy.*``, ``folder_paths``): imported only inside a running ComfyUI."""

from __future__ import annotations

import os

PREFERENCE_FOLDER = "denscore"
WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".bin", ".pth")


ADAPTER_FOLDER = "longalign"


def register_model_folders() -> None:
    """Register ``models/denscore`` (preference models) and ``models/longalign`` (LongSD T5 adapter) with
    ``folder_paths``, idempotently."""
    import folder_paths

    for name in (PREFERENCE_FOLDER, ADAPTER_FOLDER):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = (
                [os.path.join(folder_paths.models_dir, name)], set(WEIGHT_EXTENSIONS))


def list_model_folders(folder_name: str) -> list[str]:
    """Sub-folders holding a ``config.json`` (Hugging Face / diffusers model folders) under a model folder."""
    import folder_paths

    register_model_folders()
    names = set()
    for root in folder_paths.get_folder_paths(folder_name):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            if "config.json" in filenames and dirpath != root:
                names.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames[:] = []
    return sorted(names)


def resolve_in(folder_name: str, name: str, what: str) -> str:
    """Full path of ``name`` inside one of a model folder's roots; the error names the folders."""
    import folder_paths

    register_model_folders()
    roots = folder_paths.get_folder_paths(folder_name)
    for root in roots:
        if os.path.exists(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(f"{what} {name!r} not found in {roots}")


def list_loras() -> list[str]:
    import folder_paths

    return [f for f in folder_paths.get_filename_list("loras") if f.endswith((".pt", ".safetensors", ".bin"))]


def lora_path(name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise("loras", name)


def unet_config(model) -> dict:
    """The LDM-style UNet config of a ComfyUI MODEL."""
    return dict(model.model.model_config.unet_config)


def count_unet_lora_matches(model, kohya_state: dict) -> tuple[int, int]:
    """(LoRA layers ComfyUI's UNet key map knows, LoRA layers in ``kohya_state``) for a ComfyUI MODEL."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    names = {k.rsplit(".lora_down.weight", 1)[0] for k in kohya_state if k.endswith(".lora_down.weight")}
    return sum(1 for n in names if n in key_map), len(names)


def apply_unet_lora(model, kohya_state: dict, strength: float):
    """Clone ``model`` and add the LoRA as ComfyUI patches (through its public loader)."""
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, kohya_state, strength, 0.0)
    return patched


def list_preference_models() -> list[str]:
    """Names under ``models/denscore``: Hugging Face model folders (holding ``config.json`` and weights) and
    open_clip checkpoint files, as paths relative to their root."""
    import folder_paths

    register_model_folders()
    names: set[str] = set()
    for root in folder_paths.get_folder_paths(PREFERENCE_FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            if "config.json" in filenames and any(f.startswith(("model.safetensors", "pytorch_model"))
                                                  for f in filenames):
                names.add(rel.replace(os.sep, "/"))
                dirnames[:] = []  # a model folder's files are not separate models
                continue
            for f in filenames:
                if f.endswith(WEIGHT_EXTENSIONS):
                    names.add(os.path.join(rel, f).replace(os.sep, "/").removeprefix("./"))
    return sorted(names)


def resolve_preference_model(name: str) -> str:
    """Full path of a name from :func:`list_preference_models`; the error names the folder and the name."""
    import folder_paths

    register_model_folders()
    roots = folder_paths.get_folder_paths(PREFERENCE_FOLDER)
    for root in roots:
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"preference model {name!r} not found in {roots}; put a Denscore/PickScore folder "
                            f"(config.json + model.safetensors) or an HPSv2 .pt there")


def user_cache_dir() -> str:
    import folder_paths

    path = os.path.join(folder_paths.get_user_directory(), "longalign")
    os.makedirs(path, exist_ok=True)
    return path


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def progress_bar(total: int):
    """ComfyUI's progress bar for the node being executed."""
    import comfy.utils

    return comfy.utils.ProgressBar(total)


def preferred_dtype(precision: str, device=None):
    """``auto``: fp16 where ComfyUI would use it on ``device`` (default: its main device), else fp32."""
    from ..longalign_core.dtypes import dtype_from_name

    if precision != "auto":
        return dtype_from_name(precision)
    import torch

    import comfy.model_management as mm

    device = mm.get_torch_device() if device is None else device
    return torch.float16 if not mm.is_device_cpu(device) and mm.should_use_fp16(device) else torch.float32


def preferred_text_encoder_dtype(precision: str):
    """``auto`` for a T5 encoder: bf16 where ComfyUI would use it on the text-encoder device, else fp32 (T5
    overflows in fp16)."""
    from ..longalign_core.dtypes import dtype_from_name

    if precision != "auto":
        return dtype_from_name(precision)
    import torch

    import comfy.model_management as mm

    device = mm.text_encoder_device()
    return torch.bfloat16 if not mm.is_device_cpu(device) and mm.should_use_bf16(device) else torch.float32


def model_patcher(modules: dict, load_device, offload_device):
    """A ComfyUI ModelPatcher over plain torch modules, so ComfyUI's memory manager moves them on and off the
    device (and evicts them when sampling needs the room)."""
    import torch

    import comfy.model_patcher

    holder = torch.nn.Module()  # ModelPatcher sets bookkeeping attributes on the module it manages
    for name, module in modules.items():
        holder.add_module(name, module)
    return comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)


def load_model(bundle) -> None:
    """Put a preference model on ComfyUI's device through its memory manager (so it can be evicted)."""
    import comfy.model_management as mm

    if bundle.patcher is None:
        bundle.patcher = model_patcher({"preference_model": bundle.model.model}, mm.get_torch_device(),
                                       mm.unet_offload_device())
    mm.load_models_gpu([bundle.patcher])


def text_encoder_patcher(modules: dict):
    """A ModelPatcher for text-encoder-side modules: loaded on ComfyUI's text-encoder device, offloaded where
    ComfyUI offloads its own text encoders."""
    import comfy.model_management as mm

    return model_patcher(modules, mm.text_encoder_device(), mm.text_encoder_offload_device())


def text_encoder_offload_device():
    import comfy.model_management

    return comfy.model_management.text_encoder_offload_device()


def load_patchers(patchers: list) -> None:
    import comfy.model_management as mm

    mm.load_models_gpu(patchers)


# -- the training nodes' seams (nodes/training_nodes.py) -----------------------------------------------------------


def blocked_output():
    """An output value that keeps the nodes downstream of it from running, silently (ComfyUI's ExecutionBlocker)."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(None)


def output_dir(*parts: str) -> str:
    """A folder under ComfyUI's output/ (``--output-directory`` / ``--base-directory`` honoured)."""
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), *parts)


def input_dir() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


def list_checkpoints() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("checkpoints")


def find_model_file(folder_name: str, name: str) -> str | None:
    """Full path of ``name`` in a ComfyUI model folder (``checkpoints``, ``loras``), or None."""
    import folder_paths

    return folder_paths.get_full_path(folder_name, name)


def model_folders(folder_name: str) -> list[str]:
    import folder_paths

    return folder_paths.get_folder_paths(folder_name)


def free_the_device() -> None:
    """ComfyUI's loaded models off the GPU and its cache emptied: a child process gets the whole device."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def cancel_requested() -> bool:
    """The user pressed Cancel (without clearing the request, as the progress hook would)."""
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def interrupt_exception_type() -> type[BaseException]:
    import comfy.model_management

    return comfy.model_management.InterruptProcessingException


def raise_cancelled() -> None:
    """End the node as cancelled: ComfyUI shows the prompt as interrupted."""
    import comfy.model_management as mm

    mm.interrupt_current_processing(False)
    raise mm.InterruptProcessingException()


def node_text(node_id, text: str) -> None:
    """A line of text on the node in the frontend (ComfyUI's progress text); nothing without a server."""
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # noqa: BLE001 — in-process use has no server: the text is only a courtesy
        pass
