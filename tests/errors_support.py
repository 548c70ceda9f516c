"""Helpers for the bad-input catalogues (tests/test_errors_*.py): run a CLI or call an API with a user mistake
and check the four promises of the project's error handling:

1. the exit code (2 for a user error) or the exception type;
2. the message names what is wrong: the file, line or option (each given string must appear in it);
3. no traceback for a user error (stderr is one paragraph; a traceback appears only with ``--debug``);
4. nothing lost: every file under the watched folders is byte-identical afterwards and no file appeared (no
   temp file, no half-written output).

Reusable by the trainer and node catalogues: ``watched(folder)`` snapshots a tree, ``cli_error(...)`` runs a
CLI ``main`` through :func:`longalign_core.errors.run_cli` in-process (fast: the models stay loaded), and
``module_errors(...)`` runs ``python -m module`` in subprocesses for the real entry points.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]


def snapshot(*folders: Path) -> dict[str, bytes | str]:
    """Every entry under ``folders`` (hidden ones included): file bytes, or ``"<dir>"`` / ``"-> target"``."""
    state: dict[str, bytes | str] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            continue
        for root, dirs, files in os.walk(folder, followlinks=False):
            for name in dirs + files:
                p = Path(root) / name
                key = str(p)
                if p.is_symlink():
                    state[key] = "-> " + os.readlink(p)
                elif p.is_dir():
                    state[key] = "<dir>"
                elif p.is_file():
                    try:
                        state[key] = p.read_bytes()
                    except OSError:  # unreadable on purpose (permission cases)
                        state[key] = f"<unreadable {p.stat().st_size}>"
    return state


def assert_unchanged(before: dict[str, bytes | str], *folders: Path) -> None:
    """Fail naming every file that changed, vanished or appeared (a temp file left behind, a half-written
    output) since ``before``."""
    after = snapshot(*folders)
    appeared = sorted(set(after) - set(before))
    vanished = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (appeared or vanished or changed), (
        f"files appeared: {appeared}; vanished: {vanished}; changed: {changed}")


@contextlib.contextmanager
def watched(*folders: Path) -> Iterator[None]:
    """``with watched(out_dir): ...`` asserts that nothing under ``out_dir`` changed inside the block."""
    before = snapshot(*folders)
    yield
    assert_unchanged(before, *folders)


def assert_names(message: str, names: Sequence[object]) -> None:
    """Every one of ``names`` (a path, option, ``file:line``) appears in ``message``."""
    missing = [str(n) for n in names if str(n) not in message]
    assert not missing, f"the message does not name {missing}:\n{message}"


def _is_progress(line: str) -> bool:
    """A progress-bar line (tqdm / transformers' "Loading weights"), not part of the message."""
    return "it/s]" in line or "%|" in line or "s/it]" in line


def assert_no_traceback(stderr: str, prog: str | None = None) -> None:
    """No traceback, and one paragraph (``prog: error: …`` when ``prog`` is given) besides progress bars."""
    assert "Traceback" not in stderr, f"a traceback was printed for a user error:\n{stderr}"
    lines = [line for line in stderr.splitlines() if line.strip() and not _is_progress(line)]
    assert len(lines) == 1, f"expected one paragraph on stderr, got {len(lines)} lines:\n{stderr}"
    if prog is not None:
        assert lines[0].startswith(f"{prog}: error: "), lines[0]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def cli_error(main: Callable, argv: Sequence[object], capsys, *, names: Sequence[object] = (),
              watch: Sequence[Path] = (), prog: str = "longalign", code: int = 2) -> CliResult:
    """Run ``main(argv)`` through ``run_cli`` in-process; assert exit ``code``, one paragraph naming ``names``
    on stderr and no traceback, and that nothing under ``watch`` changed. Returns the captured result."""
    from longalign_core.errors import run_cli

    before = snapshot(*watch)
    capsys.readouterr()
    rc = run_cli(main, [str(a) for a in argv], prog=prog)
    out, err = capsys.readouterr()
    assert rc == code, f"exit code {rc}, expected {code}; stderr:\n{err}"
    assert_no_traceback(err, prog)
    assert_names(err, names)
    assert_unchanged(before, *watch)
    return CliResult(rc, out, err)


def module_errors(cases: Sequence[tuple], cwd: Path, *, code: int = 2, timeout: float = 300) -> list[CliResult]:
    """Run ``python -m module argv`` for each ``(module, argv, names, watch)`` side by side in subprocesses
    (the real entry points, offline); for each, the same assertions as :func:`cli_error`. A case whose argv
    holds ``--debug`` must show the traceback instead."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    befores = [snapshot(*watch) for _, _, _, watch in cases]
    procs = [subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for module, argv, _, _ in cases]
    results = []
    for proc, before, (module, argv, names, watch) in zip(procs, befores, cases):
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == code, f"{module}: exit code {proc.returncode}, expected {code}:\n{err}"
        if "--debug" in argv:
            assert "Traceback" in err, err
        else:
            assert_no_traceback(err, f"python -m {module}")
        assert_names(err, names)
        assert_unchanged(before, *watch)
        results.append(CliResult(proc.returncode, out, err))
    return results


def api_error(call: Callable[[], object], error: type[BaseException], *, names: Sequence[object] = (),
              watch: Sequence[Path] = ()) -> BaseException:
    """``call()`` raises ``error`` whose message names ``names``, and leaves ``watch`` unchanged."""
    before = snapshot(*watch)
    with pytest.raises(error) as info:
        call()
    assert_names(str(info.value), names)
    assert_unchanged(before, *watch)
    return info.value


def previous_outputs(folder: Path, *names: str) -> list[Path]:
    """Files standing for a previous run's outputs (distinct bytes each) in ``folder``, to check that a failed
    run leaves them byte-identical."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        p = folder / name
        p.write_bytes(f"previous output {name}\n".encode() * 3)
        paths.append(p)
    return paths


def truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """``dst`` holding the first ``fraction`` of ``src``'s bytes (an interrupted download or copy)."""
    data = src.read_bytes()
    dst.write_bytes(data[:max(1, int(len(data) * fraction))])
    return dst


def symlink_loop(folder: Path, name: str) -> Path:
    """``folder/name`` → ``folder/name.loop`` → ``folder/name``."""
    a, b = folder / name, folder / f"{name}.loop"
    os.symlink(b, a)
    os.symlink(a, b)
    return a
