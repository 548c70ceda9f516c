"""The trainer and the evaluation run as a child process of ComfyUI (its own interpreter, ``-m trainer.finetune`` /
``-m trainer.evaluate``), so that the GPU is theirs alone and a crash or an out-of-memory never takes ComfyUI down.
This module is both ends of that, in plain Python (no ComfyUI, no torch):

* the child side: with ``LONGALIGN_PROGRESS=1`` in its environment the child prints one machine-readable line per
  step, ``LONGALIGN_PROGRESS {"step": 3, "total": 10, "seconds_per_step": 1.2, "eta": 8.4}``, and one per
  validation image (``"image": path``) — :func:`report_progress`;
* the parent side: :class:`ChildRun` starts the child, reads its output line by line, hands each progress line to a
  callback, stops the child gracefully when asked (SIGINT: the trainer finishes the step under way, keeps a
  checkpoint of it and exits), and :func:`outcome_message` turns how it ended into one paragraph for the user.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .run_folder import complete_checkpoints

PROGRESS_ENV = "LONGALIGN_PROGRESS"
PROGRESS_PREFIX = "LONGALIGN_PROGRESS "
#: A user mistake: the child printed one paragraph (``<prog>: error: …``) and no traceback.
EXIT_USER_ERROR = 2
#: Stopped by a signal after keeping the step under way (the trainer's contract, trainer/stop_signal.py: 128 + the
#: signal's number, as a shell reports it).
EXIT_STOPPED = {130: "SIGINT", 143: "SIGTERM"}
#: The trainer's dependencies beyond the pack's requirements.txt, as (module, pip requirement).
TRAINING_PACKAGES = (("peft", "peft>=0.12,<1"), ("accelerate", "accelerate>=0.33,<2"))


# -- the child's side ------------------------------------------------------------------------------------------


def report_progress(**fields) -> None:
    """Print one progress line for the parent when it asked for them (``LONGALIGN_PROGRESS=1``); else nothing."""
    if os.environ.get(PROGRESS_ENV) == "1":
        print(PROGRESS_PREFIX + json.dumps(fields, default=str), flush=True)


# -- the parent's side -----------------------------------------------------------------------------------------


def split_progress(line: str) -> tuple[str, dict | None]:
    """(the line's other text, the fields of its progress report or None). A progress report may follow other
    output on the same line: the child's stderr (a tqdm bar redrawn with carriage returns, no newline) shares
    the pipe with its stdout. A damaged report is left as text."""
    at = line.find(PROGRESS_PREFIX)
    if at < 0:
        return line, None
    try:
        fields = json.loads(line[at + len(PROGRESS_PREFIX):])
    except ValueError:
        return line, None
    if not isinstance(fields, dict):
        return line, None
    return line[:at], fields


def module_command(module: str, arguments: Sequence[str], python: str | None = None) -> list[str]:
    """``[python, "-m", module, *arguments]`` with this interpreter by default (ComfyUI's own)."""
    return [python or sys.executable, "-m", module, *map(str, arguments)]


def child_environment(pack_dir: str | os.PathLike, base: dict | None = None) -> dict:
    """The child's environment: progress lines on, the pack folder first on ``PYTHONPATH`` (so ``trainer`` and
    ``longalign_core`` are this pack's), unbuffered output."""
    env = dict(os.environ if base is None else base)
    env[PROGRESS_ENV] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pack_dir), env.get("PYTHONPATH")]))
    return env


def missing_training_packages(find_spec: Callable[[str], object] | None = None) -> list[str]:
    """The pip requirements of :data:`TRAINING_PACKAGES` that this interpreter cannot import."""
    if find_spec is None:
        import importlib.util

        find_spec = importlib.util.find_spec
    return [req for module, req in TRAINING_PACKAGES if find_spec(module) is None]


def install_command_message(missing: Sequence[str], python: str | None = None) -> str:
    """One paragraph naming the missing packages and the exact command for ComfyUI's Python (portable and venv)."""
    quoted = " ".join(f'"{r}"' for r in missing)
    python = python or sys.executable
    return (f"Training needs {', '.join(r.split('>')[0].split('<')[0] for r in missing)}, which this ComfyUI's "
            f"Python ({python}) does not have. Install them into ComfyUI's own Python and restart ComfyUI: "
            f"portable Windows build, in the ComfyUI_windows_portable folder: "
            f"python_embeded\\python.exe -m pip install {quoted}; a venv or other install: "
            f"\"{python}\" -m pip install {quoted}. (ComfyUI Manager installs them with the pack; they do not "
            f"replace torch.)")


@dataclass
class ChildResult:
    """How a child ended: its exit code (negative: killed by that signal), whether the user cancelled it, its
    last lines of output and its last progress fields."""

    returncode: int
    cancelled: bool
    tail: list[str] = field(default_factory=list)
    last_progress: dict = field(default_factory=dict)
    seconds: float = 0.0


class ChildRun:
    """Run ``command`` as a child, feed ``on_progress`` with its progress lines, stop it gracefully when
    ``should_cancel()`` turns true. The child gets its own process group (a Ctrl+C in ComfyUI's console reaches
    ComfyUI, which stops the child the same way) and is stopped if ComfyUI exits first."""

    def __init__(self, command: Sequence[str], cwd: str | os.PathLike, env: dict, log_file: str | os.PathLike,
                 tail_lines: int = 60):
        self.command, self.cwd, self.env, self.log_file = list(command), cwd, env, Path(log_file)
        self.tail_lines = tail_lines
        self.proc: subprocess.Popen | None = None

    def run(self, on_progress: Callable[[dict], None], should_cancel: Callable[[], bool],
            poll_seconds: float = 0.2, grace_seconds: float | None = None) -> ChildResult:
        """Run to the end. Returns a :class:`ChildResult`; ``grace_seconds`` after a cancel, a child that has not
        exited is killed (None: wait for it as long as it takes to finish its step)."""
        t0 = time.perf_counter()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        flags = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else \
            {"start_new_session": True}
        lines: queue.Queue = queue.Queue()
        tail: list[str] = []
        last: dict = {}
        cancelled = False
        with open(self.log_file, "a", encoding="utf-8") as log:
            log.write("$ " + shlex.join(self.command) + "\n")  # the command, ready to paste in a shell
            log.flush()
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                                         bufsize=1, **flags)
            reader = threading.Thread(target=_pump, args=(self.proc.stdout, lines), daemon=True)
            reader.start()
            import atexit

            atexit.register(self._stop_quietly)
            try:
                cancel_at = None
                while True:
                    try:
                        line = lines.get(timeout=poll_seconds)
                    except queue.Empty:
                        line = ""
                    if line is None:  # end of output: the child is gone
                        break
                    if line:
                        text, progress = split_progress(line.rstrip("\n"))
                        if text.strip():
                            log.write(text + "\n")
                            tail = (tail + [text])[-self.tail_lines:]
                        if progress is not None:
                            last.update(progress)
                            on_progress(progress)
                    if not cancelled and should_cancel():
                        cancelled, cancel_at = True, time.perf_counter()
                        self.interrupt()
                    if cancel_at is not None and grace_seconds is not None and \
                            time.perf_counter() - cancel_at > grace_seconds and self.proc.poll() is None:
                        self.proc.kill()
                returncode = self.proc.wait()
            finally:
                if self.proc.poll() is None:  # an exception in a callback: do not leave the child behind
                    self.proc.kill()
                    self.proc.wait()
                atexit.unregister(self._stop_quietly)
            seconds = time.perf_counter() - t0
            log.write(f"[exit code {returncode}{' after cancel' if cancelled else ''}, {seconds:.2f} s]\n")
        return ChildResult(returncode, cancelled, tail, last, seconds)

    def interrupt(self) -> None:
        """Ask the child to stop after the step under way (SIGINT; CTRL_BREAK on Windows)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if os.name == "nt":
            self.proc.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            self.proc.send_signal(signal.SIGINT)

    def _stop_quietly(self) -> None:
        try:
            self.interrupt()
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 — ComfyUI is exiting; nothing to report to
            pass


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


# -- what to tell the user -------------------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, int] | None:
    """(folder, step) of the newest complete trainer checkpoint in ``run_dir``, or None."""
    found = complete_checkpoints(run_dir)
    return (found[-1], int(found[-1].name.split("-")[1])) if found else None


def user_error_paragraph(tail: Sequence[str], prog: str) -> str | None:
    """The child's own one-paragraph error (``<prog>: error: …``) from its output, or None."""
    marker = f"{prog}: error: "
    for line in reversed(tail):
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None


def signal_name(returncode: int) -> str:
    """``SIGKILL`` for -9 (POSIX: a negative exit code is the signal that ended the process)."""
    try:
        return signal.Signals(-returncode).name
    except (ValueError, AttributeError):
        return f"signal {-returncode}"


def checkpoint_kept(run_dir: str | os.PathLike, resume_hint: str) -> str:
    """What a stopped training run keeps: its newest checkpoint and how to continue, or that there is none."""
    kept = latest_checkpoint(run_dir)
    return (f"the checkpoint of step {kept[1]} is kept in {kept[0]}; {resume_hint}" if kept
            else f"no checkpoint was written yet (the run folder is {run_dir})")


def outcome_message(result: ChildResult, what: str, prog: str, kept: str) -> str | None:
    """None when the child finished (exit code 0); else the one paragraph to show: the child's own user-mistake
    paragraph (exit code 2) as it is; a cancel with what is kept (``kept``, e.g. :func:`checkpoint_kept`); a
    child killed from outside (a signal or an unexpected code) named, with what is kept and its last lines."""
    if result.returncode == 0 and not result.cancelled:
        return None
    if result.cancelled:
        return f"{what} cancelled: {kept}."
    if result.returncode == EXIT_USER_ERROR:
        paragraph = user_error_paragraph(result.tail, prog)
        if paragraph:
            return paragraph
    if result.returncode in EXIT_STOPPED:
        return (f"{what} was stopped from outside ComfyUI ({EXIT_STOPPED[result.returncode]} to its process, exit "
                f"code {result.returncode}): {kept}.")
    how = (f"was killed by {signal_name(result.returncode)} (from outside ComfyUI: out of system memory, the OS "
           f"or a user)" if result.returncode < 0 else f"stopped with exit code {result.returncode}")
    last = "\n".join(result.tail[-15:])
    return f"{what} {how}: {kept}. Its last output:\n{last}"
