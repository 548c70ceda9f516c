"""The processes of an evaluation: one, or several under ``accelerate launch`` / ``torchrun`` (accelerate's
:class:`~accelerate.PartialState` reads their environment; gloo on the CPU, NCCL on GPUs). The prompt groups to
do are dealt out in turn, each process writes its own rows (:func:`trainer.evaluate.files.part_file`), and the main
process merges them in one order, so the scores do not depend on how many processes made them."""

from __future__ import annotations

import contextlib

import torch


class Processes:
    """This process's place among the evaluation's processes, its device, and the waits between them."""

    def __init__(self):
        from accelerate import PartialState

        # cpu=True without a CUDA GPU: accelerate then sets torchrun's processes up with gloo (as the trainer)
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.device = self.state.device

    def wait(self) -> None:
        """Every process reaches this point before any goes on (nothing to wait for alone)."""
        if self.world > 1:
            self.state.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the block first (it may write the built-in models' files), then the others."""
        with self.state.main_process_first():
            yield

    def share(self, todo: list) -> list:
        """This process's items of ``todo``: every ``world``-th one from its rank on (balanced to one item; the
        order of ``todo`` is kept, so each process merges each arm's LoRA once)."""
        return todo[self.rank::self.world]
