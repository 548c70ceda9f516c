"""Did the LoRA help? The base model against the same model with one or more LoRAs, on held-out long prompts,
sentence by sentence, with confidence intervals.

Demo on the CPU (the built-in tiny models; the LoRA ``./dev run`` trained, if there is one):

    python -m trainer.evaluate

A real comparison (SD1.5 or SDXL, any LoRA of this trainer or of the LongSD release, Denscore as the judge):

    python -m trainer.evaluate --model /models/stable-diffusion-v1-5 --reward-model /models/denscore/Denscore \\
        --lora outputs/reward/longalign_lora.safetensors --lora outputs/reward/longalign_lora.safetensors:0.5 \\
        --seeds 2 --output-dir outputs/eval

Every arm (the base, and each ``--lora FILE[:STRENGTH]``) samples every prompt from the same noise with the
trainer's validation sampler (DDIM, CFG with the empty prompt, segment-level conditioning), and every image is
scored with Denscore (or another preference model) against its prompt, decomposed along V from the shipped
reference prompt set. ``<output-dir>`` gets the images, ``scores.csv`` (one row per arm, prompt, seed and
sentence), ``report.md`` / ``report.png`` (means and differences with 95 % bootstrap intervals over prompts,
win rates, the sentences that gained and lost most, a reward-hacking flag) and ``grids/`` (per prompt, the arms
side by side with their scores). ``--resume`` continues an interrupted evaluation; ``--report-only`` rebuilds
the report from ``scores.csv``. ``accelerate launch --num_processes N -m trainer.evaluate …`` (or torchrun) deals
the prompt groups out to N processes; the scores are byte for byte one process's. User mistakes print one paragraph
and exit with code 2 (``--debug`` keeps the traceback). docs/evaluate.md says what each number means.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from longalign_core.errors import BadInputError, run_cli

from .config import DEMO_LORA, EvalConfig
from .evaluation import Evaluation
from .files import SCORES_FILE
from .processes import Processes

PROG = "python -m trainer.evaluate"


def rebuild_report(cfg: EvalConfig) -> str:
    """``--report-only``: the report of the evaluation in ``--output-dir``, from its scores.csv alone."""
    from .report import write_evaluation_report

    out = Path(cfg.output_dir)
    if not (out / SCORES_FILE).is_file():
        raise BadInputError(f"--report-only: {out / SCORES_FILE} not found; run the evaluation first (or give its "
                            f"--output-dir)")
    return write_evaluation_report(out, cfg.bootstrap, cfg.bootstrap_seed)


def main(argv: list[str] | None = None) -> int:
    """Evaluate; user mistakes raise :class:`~longalign_core.errors.LongAlignError` (see :func:`cli`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    cfg = EvalConfig.from_args(argv, description=__doc__)
    if cfg.report_only:
        if Processes().is_main:
            print(rebuild_report(cfg), flush=True)
        return 0
    evaluation = Evaluation(cfg)
    if cfg.model is None and evaluation.procs.is_main:
        lora = (f"the LoRA ./dev run trained ({evaluation.demo_lora}) against the base" if evaluation.demo_lora
                else "the --lora arm(s) against the base" if cfg.lora
                else f"the base alone (no LoRA at {DEMO_LORA}: run ./dev run first, or pass --lora)")
        print(f"No --model given: evaluating the built-in tiny random-weight SD1.5-shaped pipeline on the CPU, "
              f"{lora}, judged by the built-in tiny preference model (the pictures are noise; the numbers show "
              f"the pipeline). Pass --model, --reward-model and --lora for a real comparison.", flush=True)
    from ..stop_signal import resume_command, run_stoppable  # a stop ends the group under way, exits 130 / 143

    return run_stoppable(lambda stop: evaluation.run(stop=stop), "the prompt group under way", PROG, argv,
                         after_disk_full=lambda: f"The prompt groups in {evaluation.scores_file} are kept; once there "
                                                 f"is room, continue with: {resume_command(PROG, argv, ['--resume'])}")



def cli(argv: list[str] | None = None) -> int:
    """``python -m trainer.evaluate``: user mistakes print one paragraph (no traceback) and exit with code 2."""
    return run_cli(main, argv, prog=PROG)

