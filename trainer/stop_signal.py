"""Stopping a long run without losing work: SIGTERM (a scheduler, ``timeout``, a closed terminal), SIGINT (Ctrl-C)
and, on Windows, SIGBREAK (CTRL_BREAK_EVENT, what a parent process sends a child) ask the run to stop at its next
safe point: the trainer finishes the step under way and checkpoints it, the evaluation finishes the prompt group
under way and writes it. A second signal stops at once (every file is written atomically, so nothing
half-written is left). Used by ``trainer.finetune`` and ``trainer.evaluate``; the previous handlers come back on
exit, so a caller's own handling (a test runner, a ComfyUI process) is untouched.

Exit codes (docs/trainer.md): 128 + the signal's number, as a shell reports a process killed by it: 130 after
SIGINT (and after SIGBREAK), 143 after SIGTERM; the same codes when a second signal stopped the run at once.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading

#: The signals that ask for a stop: those of this platform.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name))


def exit_code(signum: int) -> int:
    """The exit status after ``signum``: 130 for SIGINT and SIGBREAK (Ctrl-C / Ctrl-Break), 143 for SIGTERM."""
    return 143 if signum == getattr(signal, "SIGTERM", None) else 130


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopNow(KeyboardInterrupt):
    """A stop signal during start-up, or a second one: raised where the program is, so it unwinds at once (atomic
    writers remove their temporary files on the way). ``run_cli`` prints :attr:`message` and exits with
    :attr:`exit_code`."""

    def __init__(self, signum: int, second: bool):
        self.signum, self.exit_code = signum, exit_code(signum)
        self.message = (f"stopped at once by a second {signal_name(signum)}; what was saved before is intact (the "
                        f"last complete checkpoint, or every prompt group already in scores.csv)" if second else
                        f"stopped by {signal_name(signum)} during start-up, before anything worth keeping was made")
        super().__init__(self.message)


class Stopped(Exception):
    """The run stopped at a safe point after a stop signal: :attr:`detail` says what was kept, :attr:`resume`
    is what to add to the command to continue (``[]``: nothing was kept, run the same command again)."""

    def __init__(self, signum: int, detail: str, resume: list[str], processes: int = 1, is_main: bool = True):
        self.signum, self.detail, self.exit_code = signum, detail, exit_code(signum)
        self.resume, self.processes, self.is_main = resume, processes, is_main
        super().__init__(detail)

    def line(self, prog: str, argv: list[str]) -> str:
        """The one line printed on the way out: what was kept and the exact command that continues."""
        command = resume_command(prog, argv, self.resume)
        launcher = "" if self.processes == 1 else f"the same launcher ({self.processes} processes) running "
        how = "Resume with" if self.resume else "Start again with"
        return f"{prog}: stopped by {signal_name(self.signum)}; {self.detail}. {how}: {launcher}{command}"


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: the stop signals are the training process's to handle (Ctrl-C
    reaches every process of the terminal's group; a worker that died of it would fail the step under way)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_help(what_finishes: str, resume: str, other_codes: str = "") -> str:
    """The ``--help`` epilog on stopping and exit codes."""
    import textwrap

    return "\n".join(textwrap.fill(text, 100) for text in (
        f"Stopping: SIGTERM or Ctrl-C (SIGINT; CTRL_BREAK_EVENT on Windows) {what_finishes} and exits; {resume} "
        f"continues. A second signal stops at once (files are written atomically: nothing half-written is left).",
        f"Exit codes: 0 done; 2 a mistake in the options or files, or a full disk (one paragraph);{other_codes} "
        f"130 stopped by SIGINT (or SIGBREAK), 143 stopped by SIGTERM."))


def run_stoppable(work, what_finishes: str, prog: str, argv: list[str], after_disk_full=None) -> int:
    """``work(stop)`` under a :class:`StopSignal`: 0 when it ends, the signal's exit code (and the line saying how
    to resume, on the main process) when it raised :class:`Stopped`. A full disk's paragraph gets
    ``after_disk_full()`` added: what is intact and the command that continues."""
    from longalign_core.errors import DiskFullError

    with StopSignal(what_finishes) as stop:
        try:
            work(stop)
        except Stopped as stopped:
            if stopped.is_main:
                print(stopped.line(prog, argv), file=sys.stderr, flush=True)
            return stopped.exit_code
        except DiskFullError as exc:
            if after_disk_full is None:
                raise
            raise DiskFullError(f"{exc}. {after_disk_full()}") from None
    return 0


def resume_command(prog: str, argv: list[str], resume: list[str]) -> str:
    """``prog argv`` with any ``--resume`` (and its value when ``resume`` has one: ``["--resume", "latest"]``)
    replaced by ``resume``."""
    takes_value = len(resume) != 1
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = takes_value
            continue
        if arg.startswith("--resume="):
            continue
        kept.append(arg)
    return " ".join([prog, *(shlex.quote(a) for a in [*kept, *resume])])


class StopSignal:
    """``with StopSignal("the step under way") as stop:`` — once :meth:`arm` ed (when the work worth finishing
    starts), the first stop signal sets :attr:`requested` (its number) and says so on stderr; a second, or one
    before :meth:`arm` (loading models: nothing to keep), raises :class:`StopNow`. Outside the main thread (where
    Python cannot set handlers) it does nothing and :attr:`requested` stays None."""

    def __init__(self, what_finishes: str):
        self.what_finishes = what_finishes
        self.requested: int | None = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def arm(self) -> "StopSignal":
        self.armed = True
        return self

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        if self.requested is not None or not self.armed:
            raise StopNow(signum, second=self.requested is not None)
        self.requested = signum
        print(f"{signal_name(signum)} received: finishing {self.what_finishes}, then saving and stopping (send it "
              f"again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, acc=None) -> int | None:
        """The stop signal if any process received one (``acc``: an accelerate ``Accelerator``; with several
        processes every one must call this at the same point: they all see the same answer and stop together)."""
        if acc is None or acc.num_processes == 1:
            return self.requested
        import torch

        mine = torch.tensor([self.requested or 0], dtype=torch.int64, device=acc.device)
        every = int(acc.gather(mine).max())
        return every or None
