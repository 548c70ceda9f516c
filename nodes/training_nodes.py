"""LongAlign Train LoRA and LongAlign Evaluate LoRA: the trainer (``python -m trainer.finetune``) and the evaluation
(``python -m trainer.evaluate``) run from a workflow, as a child process of ComfyUI's own interpreter, after
ComfyUI's models are unloaded: the GPU is the child's alone, and a crash or an out-of-memory in training never
takes ComfyUI down. Progress, previews and Cancel reach the child through
:mod:`longalign_core.child_process`; the options and checks through :mod:`longalign_core.training_job`.

Contract (ids, input names and order, outputs): /work/notes/NODE_CONTRACT.md, mirrored in docs/nodes.md."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..longalign_core import training_job as job
from ..longalign_core.checkpoint_family import checkpoint_family, safetensors_shapes
from ..longalign_core.child_process import ChildRun, checkpoint_kept, child_environment, \
    install_command_message, missing_training_packages, module_command, outcome_message
from ..longalign_core.denscore import DEFAULT_REWEIGHT
from ..longalign_core.errors import BadConfigError, BadInputError, BadModelFileError
from ..longalign_core.model_files import missing_model_message
from . import host

log = logging.getLogger("LongAlign")

#: The pack's folder: the child runs ``-m trainer.…`` with it first on PYTHONPATH.
PACK_DIR = Path(__file__).resolve().parents[1]
TRAIN_PROG, EVALUATE_PROG = "python -m trainer.finetune", "python -m trainer.evaluate"
_ADVANCED = {"advanced": True}


# -- ComfyUI seams -----------------------------------------------------------------------------------------------


def _trainable_checkpoint(ckpt_name: str) -> str:
    """Full path of ``ckpt_name``; a safetensors file that is not SD1.x/SDXL (SD3, Flux, an inpainting model…) is
    refused by name from its header alone, before anything loads."""
    path = host.find_model_file("checkpoints", ckpt_name)
    if path is None:
        raise BadModelFileError(f"ckpt_name {ckpt_name!r} is not in ComfyUI/models/checkpoints/; put the SD1.x or "
                                f"SDXL checkpoint there and press R to refresh the lists")
    if path.lower().endswith((".safetensors", ".sft")):
        shapes = safetensors_shapes(path)
        checkpoint_family(shapes, path)
        unet_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0, 4))[1]
        if unet_in != 4:  # inpainting (9: latent + mask + masked image) and other conditioned UNets
            raise BadModelFileError(f"{path}: its UNet takes {unet_in} input channels (an inpainting or other "
                                    f"image-conditioned model), which the trainer cannot fine-tune; give the base "
                                    f"SD1.x or SDXL checkpoint it was made from (4 input channels)")
    return path


def _preference_model(name: str) -> str:
    """Full path of a preference model; a folder whose config.json is missing or unreadable is named."""
    try:
        path = host.resolve_preference_model(name)
    except FileNotFoundError as exc:
        raise BadModelFileError(str(exc)) from None
    if os.path.isdir(path):
        config = Path(path, "config.json")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BadModelFileError(f"preference_model {name!r}: {config} is missing or unreadable ({exc}); the "
                                    f"folder must hold a Hugging Face CLIPModel (config.json + model.safetensors), "
                                    f"download it again") from None
    elif not os.access(path, os.R_OK):
        raise BadModelFileError(f"preference_model {name!r}: {path} cannot be read (check its permissions)")
    return path


def _lora_file(stem: str) -> Path:
    return Path(host.model_folders("loras")[0], stem + ".safetensors")


def _existing_lora(name: str, option: str) -> str:
    stem = job.clean_lora_name(name, option)
    path = host.find_model_file("loras", stem + ".safetensors")
    if path is None:
        raise BadInputError(f"{option} {name!r}: no {stem}.safetensors in ComfyUI/models/loras/ "
                            f"({', '.join(host.model_folders('loras'))}); train it first or give the name of a "
                            f"LoRA there")
    return path


def _check_dependencies() -> None:
    missing = missing_training_packages()
    if missing:
        raise BadConfigError(install_command_message(missing))


def _image(path: Path | None, fallback_text: str = "") -> torch.Tensor:
    """A PNG/JPEG as an IMAGE ``[1, H, W, 3]``; a missing one as a picture of ``fallback_text``."""
    from PIL import Image, ImageDraw

    if path is not None and path.is_file():
        picture = Image.open(path).convert("RGB")
    else:
        lines = (fallback_text or "(no picture)").splitlines()[:60]
        picture = Image.new("RGB", (8 + 6 * max(map(len, lines), default=20), 8 + 12 * len(lines)), "white")
        ImageDraw.Draw(picture).multiline_text((4, 4), "\n".join(lines).encode("latin-1", "replace").decode(
            "latin-1"), fill="black", spacing=1)
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]


def _run_child(module: str, args: list[str], run_dir: Path, total: int, node_id, what: str, prog: str,
               kept):
    """Run the child with ComfyUI's progress bar, previews and Cancel; raise what ComfyUI should show."""
    pbar = host.progress_bar(total)
    interrupted = host.interrupt_exception_type()
    stop = {"asked": False}

    def on_progress(p: dict) -> None:
        if stop["asked"] or host.cancel_requested():
            return  # ComfyUI's progress hook would raise its interrupt here; the child is being stopped
        preview = None
        if p.get("image") and Path(p["image"]).is_file():
            from PIL import Image

            preview = ("PNG", Image.open(p["image"]).convert("RGB"), 512)
        try:
            pbar.update_absolute(int(p.get("step", pbar.current)), int(p.get("total", total)), preview)
        except interrupted:
            stop["asked"] = True
        if "eta" in p:
            host.node_text(node_id, f"{what}: step {p.get('step')}/{p.get('total')}, "
                                    f"{p.get('seconds_per_step', 0):.2f} s per step, {_duration(float(p['eta']))} left")

    host.free_the_device()
    child = ChildRun(module_command(module, args), cwd=PACK_DIR, env=child_environment(PACK_DIR),
                     log_file=run_dir / "node_log.txt")
    result = child.run(on_progress, lambda: stop["asked"] or host.cancel_requested())
    message = outcome_message(result, what, prog, kept())
    if result.cancelled:
        log.warning("LongAlign: %s", message)
        host.node_text(node_id, message)
        host.raise_cancelled()
    if message:
        raise RuntimeError(message)
    return result


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s" if m else f"{s} s"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


# -- the nodes -------------------------------------------------------------------------------------------------


class LongAlignTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        host.register_model_folders()
        d = job.TRAIN_DEFAULTS
        return io.Schema(
            node_id="LongAlignTrainLoRA",
            display_name="LongAlign Train LoRA",
            category="LongAlign/training",
            description="Reward fine-tuning of a LoRA for long prompts (LongAlign's decomposed preference "
                        "optimisation) on an SD1.x or SDXL checkpoint, run by the pack's trainer as a separate "
                        "process with the GPU to itself. Modes: will it fit (memory and time of this run, nothing "
                        "written), train, resume (after Cancel).",
            inputs=[
                io.Combo.Input("mode", options=list(job.TRAIN_MODES), default="will it fit",
                               tooltip="will it fit: load everything, measure one step and report memory per part, "
                                       "peak against this GPU and the projected time (no LoRA written). train: "
                                       "train and write models/loras/<lora_name>.safetensors. resume: continue the "
                                       "run of lora_name from its last checkpoint (after Cancel or a crash)."),
                io.Combo.Input("ckpt_name", options=host.list_checkpoints(),
                               tooltip="The SD1.x or SDXL checkpoint to train on (fine-tunes such as Pony or "
                                       "Illustrious too). SD2, SD3, Flux and inpainting models are refused."),
                io.Combo.Input("preference_model", options=host.list_preference_models(),
                               tooltip="The reward: a preference model folder in models/denscore (Denscore, "
                                       "PickScore, CLIP-H) or an HPSv2 file."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Training prompts, one long prompt per line (a fifth of up to 40 prompts, "
                                        "or 8, are held out for validation). Ignored when a prompts_file is chosen."),
                io.Combo.Input("prompts_file", options=job.list_prompt_files(host.input_dir()), default=job.NO_FILE,
                               tooltip="A .txt (one prompt per line) or .jsonl ('prompt' or 'caption' field) file in "
                                       "ComfyUI's input folder; overrides prompts."),
                io.String.Input("lora_name", default="longalign_lora",
                                tooltip="The LoRA lands as models/loras/<lora_name>.safetensors when training is "
                                        "complete; its run folder (checkpoints, logs, validation images) is "
                                        "output/longalign/train/<lora_name>/."),
                io.Int.Input("steps", default=d["train_steps"], min=1, max=1_000_000,
                             tooltip="Optimizer steps (the released reward LoRA: 3750)."),
                io.Int.Input("lora_rank", default=d["lora_rank"], min=1, max=512, tooltip="LoRA rank."),
                io.Float.Input("learning_rate", default=d["learning_rate"], min=1e-8, max=1.0, step=1e-6,
                               round=False, tooltip="AdamW learning rate (warm-up: the trainer's 2000 steps)."),
                io.Int.Input("batch_size", default=d["train_batch_size"], min=1, max=256,
                             tooltip="Prompts per step. Lower it when will it fit says the step does not fit."),
                io.Int.Input("gradient_accumulation", default=d["gradient_accumulation_steps"], min=1, max=256,
                             tooltip="Micro-batches per step: batch_size × this prompts per optimizer step."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=8,
                             tooltip="Image size in pixels; 0 = the model's own (SD1.5 512, SDXL 1024)."),
                io.Int.Input("sample_steps", default=d["sample_steps"], min=1, max=1000,
                             tooltip="DDIM steps from noise per training image."),
                io.Int.Input("gradient_steps", default=d["sample_grad_steps"], min=1, max=1000,
                             tooltip="Sampling steps that get gradients (sample_steps must be a multiple of it)."),
                io.Float.Input("omega", default=DEFAULT_REWEIGHT, min=0.0, max=1.0, step=0.05,
                               tooltip="ω: weight of the text-irrelevant part of the reward (paper: 0.3)."),
                io.Int.Input("training_seed", default=d["seed"], min=0, max=2**31 - 1,
                             tooltip="Every random draw of the run derives from it: same seed, same LoRA. (Not named `seed`: the frontend would give it a randomize-after-each-run control, and mode resume needs the run's "
                             "seed.)"),
                io.Combo.Input("reward_direction", options=list(job.REWARD_DIRECTIONS), default="auto",
                               tooltip="The common text direction V: auto (batch from 32 prompts per step, else "
                                       "training), training, reference or batch (the release)."),
                io.Combo.Input("mixed_precision", options=list(job.MIXED_PRECISIONS), default="auto",
                               tooltip="auto: bf16 on a GPU, fp32 on the CPU."),
                io.Int.Input("checkpoint_every", default=d["checkpoint_every"], min=1, max=1_000_000,
                             tooltip="Keep a resumable checkpoint every N steps (Cancel also keeps the step "
                                     "under way)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing LoRA (and run folder) of that name."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Strength of the new LoRA on the MODEL output."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: this model comes out with the new LoRA applied at strength "
                                       "(connect the checkpoint's MODEL to sample with the LoRA at once)."),
                io.Int.Input("validation_every", default=d["validation_every"], min=0, max=1_000_000,
                             optional=True, extra_dict=_ADVANCED,
                             tooltip="Sample and score the held-out prompts every N steps (0: at the start and "
                                     "the end only); each validation picture becomes the node's preview."),
                io.String.Input("extra_options", default="", optional=True, extra_dict=_ADVANCED,
                                tooltip="More trainer options as on its command line (python -m trainer.finetune "
                                        "--help), e.g. --lr-warmup-steps 0 --cache-text-embeddings."),
            ],
            outputs=[
                io.String.Output("lora_name", display_name="lora_name",
                                 tooltip="The LoRA's name, for LongAlign Evaluate LoRA or a LoraLoader."),
                io.Image.Output("report", display_name="report",
                                tooltip="The run's report.png (training curves, validation parts); will it fit: "
                                        "the report as a picture."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="The run summary (report.md), or the will-it-fit report."),
                io.Model.Output("model", display_name="model",
                                tooltip="The input model with the new LoRA applied (the input itself for will it "
                                        "fit)."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, preference_model):  # at queue time, instead of ComfyUI's "value not in list"
        return missing_model_message("LongAlign Train LoRA", "preference_model", preference_model, "denscore",
                                     host.list_preference_models())

    @classmethod
    def execute(cls, mode, ckpt_name, preference_model, prompts, prompts_file, lora_name, steps, lora_rank,
                learning_rate, batch_size, gradient_accumulation, resolution, sample_steps, gradient_steps, omega,
                training_seed, reward_direction, mixed_precision, checkpoint_every, overwrite, strength, model=None,
                validation_every=job.TRAIN_DEFAULTS["validation_every"], extra_options="") -> io.NodeOutput:
        stem = job.clean_lora_name(lora_name)
        extra = job.extra_arguments(extra_options)
        checkpoint = _trainable_checkpoint(ckpt_name)
        reward = _preference_model(preference_model)
        _check_dependencies()
        fit = mode == "will it fit"
        run_dir = Path(host.output_dir("longalign", "will_it_fit" if fit else "train", stem))
        lora_file = _lora_file(stem)
        job.prepare_train_run(mode, run_dir, lora_file, stem, overwrite)
        run_dir.mkdir(parents=True, exist_ok=True)
        prompts_path = job.training_prompts_file(prompts, prompts_file, host.input_dir(), run_dir)
        args = job.train_arguments(
            mode=mode, checkpoint=checkpoint, preference_model=reward, prompts_path=prompts_path,
            output_dir=run_dir, steps=steps, lora_rank=lora_rank, learning_rate=learning_rate,
            batch_size=batch_size, gradient_accumulation=gradient_accumulation, resolution=resolution,
            sample_steps=sample_steps, gradient_steps=gradient_steps, omega=omega, seed=training_seed,
            reward_direction=reward_direction, mixed_precision=mixed_precision, checkpoint_every=checkpoint_every,
            validation_every=validation_every, extra=extra)
        _run_child("trainer.finetune", args, run_dir, steps, cls.hidden.unique_id if cls.hidden else None,
                   "will it fit" if fit else "training", TRAIN_PROG,
                   lambda: checkpoint_kept(run_dir, "the same node in mode resume continues from it"))
        if fit:
            summary = _read(run_dir / "dry_run.md")
            report = _image(None, summary)
            # no LoRA was made: the nodes that would use it (Evaluate, a sampler on the MODEL output) do not run
            return io.NodeOutput(host.blocked_output(), report, summary, host.blocked_output(),
                                 ui={"text": [summary]})
        published = job.publish_lora(run_dir / job.RUN_LORA_FILE, lora_file)
        summary = f"LoRA written to {published} ({steps} steps; run folder {run_dir}).\n\n" + \
            _read(run_dir / "report.md")
        out_model = None
        if model is not None:
            from safetensors.torch import load_file

            state = load_file(str(published))
            matched, total = host.count_unet_lora_matches(model, state)
            if matched < total:
                summary += (f"\n\nWarning: the connected model takes {matched} of the LoRA's {total} layers; it is "
                            f"not the model {ckpt_name} was trained as.")
            out_model = host.apply_unet_lora(model, state, strength)
        report = _image(run_dir / "report.png")
        return io.NodeOutput(stem, report, summary, out_model, ui=ui.PreviewImage(report, cls=cls))


class LongAlignEvaluateLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        host.register_model_folders()
        d = job.EVALUATE_DEFAULTS
        return io.Schema(
            node_id="LongAlignEvaluateLoRA",
            display_name="LongAlign Evaluate LoRA",
            category="LongAlign/training",
            description="Did the LoRA help? The checkpoint against itself with one or two LoRAs on held-out long "
                        "prompts, from the same noise, scored sentence by sentence with a preference model, with "
                        "95 % intervals, win rates and a reward-hacking flag (python -m trainer.evaluate, run as a "
                        "separate process).",
            inputs=[
                io.Combo.Input("mode", options=list(job.EVALUATE_MODES), default="evaluate",
                               tooltip="evaluate: start the evaluation run_name. resume: continue it (after "
                                       "Cancel); the images already scored are kept."),
                io.Combo.Input("ckpt_name", options=host.list_checkpoints(), tooltip="The SD1.x or SDXL checkpoint."),
                io.String.Input("lora_name", default="",
                                tooltip="A LoRA in models/loras (with or without .safetensors); link the train "
                                        "node's lora_name output here."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Strength of lora_name."),
                io.String.Input("lora_name_2", default="",
                                tooltip="Optional second LoRA arm (empty: none), e.g. another run or the same LoRA "
                                        "at another strength."),
                io.Float.Input("strength_2", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Strength of lora_name_2."),
                io.Combo.Input("preference_model", options=host.list_preference_models(),
                               tooltip="The judge: a preference model in models/denscore (Denscore)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Held-out prompts, one per line; empty = the pack's 64 evaluation prompts. "
                                        "Never the prompts the LoRA was trained on."),
                io.Int.Input("num_prompts", default=0, min=0, max=100_000,
                             tooltip="Evaluate only the first N prompts; 0 = all."),
                io.Int.Input("seeds", default=d["seeds"], min=1, max=64,
                             tooltip="Images per prompt and arm (the same noise for every arm)."),
                io.Int.Input("steps", default=0, min=0, max=1000,
                             tooltip="DDIM steps per image; 0 = the evaluation's default (25)."),
                io.Int.Input("first_seed", default=d["seed"], min=0, max=2**31 - 1,
                             tooltip="The seeds are first_seed, first_seed + 1, …; the same noise for every arm."),
                io.String.Input("run_name", default="longalign_eval",
                                tooltip="Folder under output/longalign/eval/ (images, scores.csv, report, grids)."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=8, optional=True,
                             extra_dict=_ADVANCED, tooltip="Image size; 0 = the model's own."),
                io.String.Input("extra_options", default="", optional=True, extra_dict=_ADVANCED,
                                tooltip="More options as on python -m trainer.evaluate's command line."),
            ],
            outputs=[
                io.Image.Output("report", display_name="report",
                                tooltip="report.png: means and differences with their 95 % intervals."),
                io.Image.Output("grid", display_name="grid",
                                tooltip="The first prompt's grid: the arms side by side with their scores."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="The report (report.md): means with intervals, win rates, the "
                                         "reward-hacking flag."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, preference_model):
        return missing_model_message("LongAlign Evaluate LoRA", "preference_model", preference_model, "denscore",
                                     host.list_preference_models())

    @classmethod
    def execute(cls, mode, ckpt_name, lora_name, strength, lora_name_2, strength_2, preference_model, prompts,
                num_prompts, seeds, steps, first_seed, run_name, resolution=0, extra_options="") -> io.NodeOutput:
        name = job.clean_lora_name(run_name, "run_name")
        extra = job.extra_arguments(extra_options)
        checkpoint = _trainable_checkpoint(ckpt_name)
        loras = [(_existing_lora(lora_name, "lora_name"), strength)]
        if lora_name_2.strip():
            loras.append((_existing_lora(lora_name_2, "lora_name_2"), strength_2))
        reward = _preference_model(preference_model)
        run_dir = Path(host.output_dir("longalign", "eval", name))
        job.prepare_evaluation(mode, run_dir, name)
        run_dir.mkdir(parents=True, exist_ok=True)
        prompts_path = None
        if job.prompt_lines(prompts):
            prompts_path = job.training_prompts_file(prompts, None, host.input_dir(), run_dir)
        args = job.evaluate_arguments(mode=mode, checkpoint=checkpoint, loras=loras, preference_model=reward,
                                      prompts_path=prompts_path, num_prompts=num_prompts, seeds=seeds, steps=steps,
                                      seed=first_seed, output_dir=run_dir, resolution=resolution, extra=extra)
        _run_child("trainer.evaluate", args, run_dir, 1, cls.hidden.unique_id if cls.hidden else None,
                   "evaluation", EVALUATE_PROG,
                   lambda: f"the images already scored are kept in {run_dir}; the same node in mode resume "
                           f"continues it")
        summary = _read(run_dir / "report.md")
        grids = sorted((run_dir / "grids").glob("*.*"))
        report, grid = _image(run_dir / "report.png"), _image(grids[0] if grids else None)
        return io.NodeOutput(report, grid, summary, ui=ui.PreviewImage(report, cls=cls))


NODES = [LongAlignTrainLoRA, LongAlignEvaluateLoRA]
