"""One error vocabulary for every LongAlign front-end (CLIs, nodes, trainer).

A user's mistake raises one of these; each front-end turns it into one clear message (the CLIs print one
paragraph and exit non-zero without a traceback, the nodes re-raise it so ComfyUI's dialog shows it). A bug is
anything else and keeps its traceback. All subclass ``ValueError`` so callers that catch ``ValueError`` keep
working.
"""

from __future__ import annotations

import sys
import traceback
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


# OS / format errors that come from the user's files rather than from our code.
EXPECTED_OS_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, IsADirectoryError,
                                                         NotADirectoryError, PermissionError)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, *,
            prog: str = "longalign") -> int:
    """Run a CLI ``main`` and turn user errors into one paragraph on stderr and exit code 2.

    ``--debug`` anywhere in argv (removed before ``main`` sees it) keeps the traceback. Anything that is not a
    user error propagates with its traceback: that is a bug to report.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args = [a for a in args if a != "--debug"]
    try:
        return main(args)
    except (LongAlignError, *EXPECTED_OS_ERRORS) as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {format_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def format_error(err: BaseException) -> str:
    """The one-paragraph text of a user error (OS errors name their file)."""
    if isinstance(err, OSError) and getattr(err, "filename", None):
        return f"{err.strerror or err}: {err.filename}"
    return str(err)

