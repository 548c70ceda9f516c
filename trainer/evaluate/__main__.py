"""``python -m trainer.evaluate`` (and ``accelerate launch -m trainer.evaluate``, ``torchrun -m trainer.evaluate``)."""

import sys

from .cli import cli

sys.exit(cli())
