"""One error vocabulary for every LongAlign front-end (CLIs, nodes, trainer).

A user's mistake raises one of these; each front-end turns it into one clear message (the CLIs print one
paragraph and exit non-zero without a traceback, the nodes re-raise it so ComfyUI's dialog shows it). A bug is
anything else and keeps its traceback. All subclass ``ValueError`` so callers that catch ``ValueError`` keep
working.

The helpers below are the checks every front-end needs for user files (:func:`check_input_file`,
:func:`check_output_path`, :func:`read_text_file`, :func:`read_safetensors`, :func:`check_positive`), so each
bad file gets the same message wherever it is read.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence


class LongAlignError(ValueError):
    """Base class: a problem with what the user gave us. The message names the input (file, line, option)
    and the fix."""


class BadInputError(LongAlignError):
    """A prompt, image, prompts file or other data the user passed is unusable as given."""


class BadModelFileError(LongAlignError):
    """A weights file or model folder is missing, truncated, corrupt or of the wrong kind."""


class BadConfigError(LongAlignError):
    """An option, a config file entry or a combination of options is invalid."""


class UnsupportedClipError(BadModelFileError):
    """The text encoder connected to a LongAlign node is not a CLIP one it can encode segment by segment (SD3,
    Flux, T5-based models): the message names what was found and says to use the model's own text-encode node."""


class DiskFullError(LongAlignError):
    """A write failed for lack of space or an I/O error (or would: a run refused up front); the message names the
    path and the free space there."""


#: errno values of a write that failed because of the disk, not the program: full, over quota, I/O error.
DISK_ERRNOS = {errno.ENOSPC, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
#: How writers that do not raise OSError (safetensors' Rust writer, torch.save's stream writer) report them.
_DISK_PHRASES = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122",
                 "input/output error", "file write failed", "iostream error")


def _chain(err: BaseException | None) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or during (a few deep)."""
    found = []
    while err is not None and len(found) < 6:
        found.append(err)
        err = err.__cause__ or err.__context__
    return found


def is_disk_error(err: BaseException | None) -> bool:
    """True when ``err`` (or an exception it was raised from or during) is a write failing for lack of space or
    an I/O error."""
    return any(isinstance(e, OSError) and e.errno in DISK_ERRNOS
               or not isinstance(e, OSError) and any(p in str(e).lower() for p in _DISK_PHRASES)
               for e in _chain(err))


def free_space(path: str | os.PathLike) -> tuple[Path, int]:
    """(the nearest existing folder of ``path``, its free bytes)."""
    import shutil

    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def disk_error(path: str | os.PathLike, err: BaseException) -> DiskFullError:
    """The one paragraph for a write of ``path`` that failed because of the disk: what happened, the free space
    there, that nothing half-written was kept, and what to do."""
    folder, free = free_space(path)
    text = " ".join(str(e).lower() for e in _chain(err))
    errnos = {getattr(e, "errno", None) for e in _chain(err)}
    if errnos & {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)} or any(p in text for p in _DISK_PHRASES[:4]):
        what = "the disk is full (or over quota)"
    elif errno.EIO in errnos or "input/output error" in text:
        what = "an I/O error (a failing disk, or a network or removable drive that went away)"
    else:  # torch.save's stream writer does not say why
        what = "the disk is full or failing"
    detail = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    return DiskFullError(f"writing {path} failed: {what} ({detail}); {folder} has {format_bytes(free)} free. "
                         f"Nothing half-written was kept. Free space there (or choose another output folder) and "
                         f"run again")


# OS / format errors that come from the user's files rather than from our code.
EXPECTED_OS_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, IsADirectoryError,
                                                         NotADirectoryError, PermissionError)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, *,
            prog: str = "longalign") -> int:
    """Run a CLI ``main`` and turn user errors into one paragraph on stderr and exit code 2.

    User errors are the project's :class:`LongAlignError` family, the OS errors of :data:`EXPECTED_OS_ERRORS`
    and any other ``OSError`` that names a file (a symlink loop, a name too long, a full disk): they concern the
    user's files, not our code. ``--debug`` anywhere in argv (removed before ``main`` sees it) also prints the
    traceback. Anything else propagates with its traceback: that is a bug to report.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args = [a for a in args if a != "--debug"]
    try:
        return main(args)
    except (LongAlignError, OSError) as err:
        if not is_user_error(err) and not is_disk_error(err):
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {format_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a second stop signal (trainer/stop_signal.py) says what it kept
        print(f"{prog}: {getattr(err, 'message', 'interrupted')}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except Exception as err:  # a write the atomic writer did not see (a library's own file) failing on the disk
        if not is_disk_error(err):
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {format_error(err)}", file=sys.stderr)
        return 2


def is_user_error(err: BaseException) -> bool:
    """True for errors that describe the user's input or files (see :func:`run_cli`), False for bugs."""
    if isinstance(err, (LongAlignError, *EXPECTED_OS_ERRORS)):
        return True
    return isinstance(err, OSError) and bool(getattr(err, "filename", None))


def format_error(err: BaseException) -> str:
    """The one-paragraph text of a user error (OS errors name their file)."""
    if is_disk_error(err) and not isinstance(err, LongAlignError):
        path = getattr(err, "filename", None)
        return str(disk_error(path, err)) if path else (f"a write failed: {str(err).strip() or type(err).__name__}"
                                                         f" (the disk is full or failing; {format_bytes(free_space('.')[1])}"
                                                         f" free in {Path.cwd()}): free space and run again")
    if isinstance(err, OSError) and getattr(err, "filename", None):
        what = err.strerror or str(err)
        hint = {errno.ELOOP: " (a symbolic link loop: fix or remove the link)",
                errno.EACCES: " (not allowed: check the file's permissions)"}.get(err.errno or 0, "")
        return f"{what}: {err.filename}{hint}"
    return " ".join(str(err).split("\n")) if isinstance(err, LongAlignError) else str(err)


# ------------------------------------------------------------------------------------------------------------
# Checks for user files and options


def looks_local(path: str | os.PathLike) -> bool:
    """A path that cannot be a Hugging Face Hub id (``org/name``): absolute, relative with ``./``, ``~``, a
    backslash, several parts or no ``/`` at all (``sd15``). A missing one is a typo to report, not a download."""
    text = str(path)
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1


def check_model_source(value: str, option: str, what: str) -> None:
    """A model given as a local path must exist: ``--model ./models/sd15`` that is not there is named as a
    missing path, instead of being tried as a Hub id (a failed connection, minutes later)."""
    if looks_local(value) and not Path(value).expanduser().exists():
        parent = Path(value).expanduser().parent
        hint = f"; {parent} holds: {', '.join(sorted(p.name for p in parent.iterdir())[:8])}" \
            if parent.is_dir() and any(parent.iterdir()) else ""
        raise BadModelFileError(f"{option} {value}: no such {what} (a typo in the path?{hint}). Give the local "
                                f"folder or file, or a Hugging Face Hub id written as org/name")


def check_input_file(path: str | os.PathLike, what: str, option: str | None = None,
                     error: type[LongAlignError] = BadInputError) -> Path:
    """``path`` as a readable, non-empty regular file, else ``error`` naming ``what`` (e.g. "prompts file"),
    the option it came from and the fix."""
    path = Path(path)
    where = f" (given to {option})" if option else ""
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{what} {path}{where} is a symbolic link loop; point it at a real file") from None
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            raise error(f"{what} {path}{where} not found; check the path") from None
        raise error(f"{what} {path}{where} cannot be read: {exc.strerror or exc}") from None
    if path.is_dir():
        raise error(f"{what} {path}{where} is a folder; give the file inside it") from None
    if st.st_size == 0:
        raise error(f"{what} {path}{where} is empty (0 bytes): an interrupted copy or download? Replace it")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path}{where} is not readable: check its permissions")
    return path


def check_output_path(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a place a file can be written (not a folder, its parent not a file), before any work is
    done, so a mistake costs nothing and nothing is half-written."""
    path = Path(path)
    if path.is_dir():
        raise BadConfigError(f"{option} {path} is a folder; give a file name (e.g. {path / 'out'}...)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadConfigError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise BadConfigError(f"{option} {path}: the folder {parent} is not writable")
            break
    return path


def read_text_file(path: str | os.PathLike, what: str, option: str | None = None) -> str:
    """The UTF-8 text of a user's text file (a BOM dropped, Windows/old-Mac line ends read as ``\\n``); a binary
    or mis-encoded file is an error naming it and the line (not a bare ``UnicodeDecodeError``)."""
    path = Path(path)
    where = f" (given to {option})" if option else ""
    if path.is_dir():
        raise BadInputError(f"{what} {path}{where} is a folder; give the file inside it")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{what} {path}{where} not found; check the path") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BadInputError(f"{path}:{line}: {what}{where} is not UTF-8 text (byte {exc.start}); save it as UTF-8 "
                            f"(or is it a binary file?)") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() in text mode


def read_safetensors(path: str | os.PathLike, what: str, fix: str = "download or export it again",
                     error: type[LongAlignError] = BadModelFileError) -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file; a missing, empty, truncated or corrupt file is
    ``error`` naming the file, ``what`` it is and the ``fix``."""
    from safetensors import safe_open

    path = check_input_file(path, what, error=error)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError/RuntimeError) types
        if isinstance(exc, OSError) and not str(exc):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{what} {path} is not a valid safetensors file (truncated or corrupt: {detail}); {fix}") from None


def check_weights_folder(folder: str | os.PathLike, what: str, fix: str = "download it again",
                         error: type[LongAlignError] = BadModelFileError) -> None:
    """Read the header of every ``*.safetensors`` in ``folder`` (cheap: no tensor is loaded) and check that
    ``*.bin`` weights are non-empty, so a truncated or corrupt weights file is ``error`` naming that file
    before a library fails on it without naming it."""
    from safetensors import safe_open

    folder = Path(folder)
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        check_input_file(f, f"{what} weights file", error=error)
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except Exception as exc:  # SafetensorError is not an OSError/ValueError
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise error(f"{what} weights file {f} is not a valid safetensors file (truncated or corrupt: "
                        f"{detail}); {fix}") from None


def kind_of(value) -> str:
    """``"an int"``, ``"a list"``…: the type of ``value`` for a message."""
    name = type(value).__name__
    return ("an " if name[0] in "aeiou" else "a ") + name


def check_positive(value: int | float, option: str, maximum: int | float | None = None,
                   why: str = "") -> int | float:
    """``value`` if ``1 <= value <= maximum``, else :class:`BadConfigError` naming the option and range."""
    if not value >= 1 or (maximum is not None and value > maximum):
        limit = f"1..{maximum}" if maximum is not None else ">= 1"
        raise BadConfigError(f"{option} must be {limit}, got {value}" + (f" ({why})" if why else ""))
    return value
