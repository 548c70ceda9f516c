"""Did the LoRA help? ``python -m trainer.evaluate``: the base model against the same model with LoRAs, on
held-out long prompts, sentence by sentence (docs/evaluate.md). One module a job: the options (``config``), the arms
and their weights (``arms``), the processes (``processes``), the run (``evaluation``), its files (``files``), the
statistics (``stats``), the report (``report``) and the command line (``cli``)."""

from .cli import cli, main
from .config import EVALUATION_PROMPTS, EvalConfig
from .evaluation import Evaluation

__all__ = ["EVALUATION_PROMPTS", "EvalConfig", "Evaluation", "cli", "main"]
