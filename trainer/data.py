"""What a run trains on: prompts (reward stage) read from text, JSONL or ``datasets`` folders, the order they are
drawn in, and the held-out validation prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from longalign_core.errors import BadConfigError, BadInputError
from longalign_core.io_utils import read_jsonl_texts


def load_dataset_folder(path: Path):
    """The ``datasets`` folder at ``path`` (``save_to_disk``; of a DatasetDict, its "train" split or the first)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise BadInputError(f"{path} is not a `datasets` folder written by save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def load_prompts(source: str | None, column: str = "caption", field: str | None = None) -> list[str]:
    """Prompts from a .txt (one per line), a folder of .txt files (one prompt per file), a .jsonl (``field``, or
    ``prompt``/``column``), a ``datasets`` folder, or the built-in long prompts. A bad file is a
    :class:`~longalign_core.errors.BadInputError` naming it (and the line or row)."""
    return read_prompts(source, column, field)[0]


#: Files ``save_to_disk`` writes: a folder holding one of them is a ``datasets`` folder, not a prompts folder.
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def read_prompts(source: str | None, column: str = "caption", field: str | None = None
                 ) -> tuple[list[str], list[str] | None]:
    """:func:`load_prompts` with each prompt's name: its file's name for a folder of .txt files (None for the
    other sources, whose prompts are numbered by line or row)."""
    if source is None:
        from longalign_core.reference_direction import default_reference_prompts

        return default_reference_prompts(), None
    path = Path(source)
    if field is not None and path.suffix != ".jsonl":
        raise BadConfigError(f"--prompt-field {field}: it names the prompt's field in a .jsonl file, and --prompts "
                             f"{path} is not one; drop --prompt-field or give the .jsonl")
    names = None
    if path.is_dir() and not any((path / m).is_file() for m in DATASET_MARKERS):
        prompts, names = read_prompt_folder(path)
    elif path.is_dir():
        ds = load_dataset_folder(path)
        if column not in ds.column_names:
            raise BadInputError(f"{path} has no column {column!r} (columns: {ds.column_names}); set --caption-column")
        prompts = list(ds[column])
        check_captions(prompts, path, column)
    elif path.suffix == ".jsonl":
        prompts = read_jsonl_texts(path, column, option="--prompts", allow_empty=False, field=field)
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[: exc.start].count(b"\n") + 1
            raise BadInputError(f"{path}:{line}: not UTF-8 text ({exc.reason}); save the prompts file as UTF-8") \
                from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raise BadConfigError(f"prompts file or folder {path} not found (--prompts or --validation-prompts)")
    if not prompts:
        raise BadInputError(f"no prompts found in {path}")
    return prompts, names


def read_prompt_folder(folder: Path) -> tuple[list[str], list[str]]:
    """(prompts, file names) of a folder of .txt files, one prompt per file (DPG-Bench's ``prompts/``), in the
    order of the file names. A file's lines are one prompt, joined with spaces; other files are not read."""
    from longalign_core.errors import read_text_file

    files = sorted((f for f in folder.iterdir() if f.suffix.lower() == ".txt" and f.is_file()),
                   key=lambda f: f.name)
    if not files:
        others = sorted(f.name for f in folder.iterdir())
        found = (f"it holds {len(others)} other entries ({', '.join(others[:5])}{', …' if len(others) > 5 else ''})"
                 if others else "it is empty")
        raise BadInputError(f"--prompts {folder}: a folder of prompts needs .txt files, one prompt per file "
                            f"(DPG-Bench's prompts/ layout), and {found}. Give that folder, a .txt file with one "
                            f"prompt per line, a .jsonl file, or a `datasets` folder written by save_to_disk")
    prompts = []
    for f in files:
        text = " ".join(line.strip() for line in read_text_file(f, "prompt file", "--prompts").splitlines()
                        if line.strip())
        if not text:
            raise BadInputError(f"{f}: empty prompt file (--prompts {folder}: each .txt file in the folder is one "
                                f"prompt); write the prompt into it or remove the file")
        prompts.append(text)
    return prompts, [f.name for f in files]


def check_captions(captions: list, folder, column: str) -> None:
    """Every row of a ``datasets`` column is a caption with text; the first that is not is a
    :class:`BadInputError` naming the folder, the row and the column (found at load, not at the step that would
    draw it hours later)."""
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise BadInputError(f"{folder}: row {i} of column {column!r} is {type(c).__name__}, not a string caption")
        if not c.strip():
            raise BadInputError(f"{folder}: row {i} of column {column!r} is empty{' (only spaces)' if c else ''}: "
                                f"every training caption needs text; fill it in or filter the row out "
                                f"(ds.filter(lambda r: r[{column!r}].strip()))")


def batch_prompts(prompts: list[str], seed: int, step: int, micro: int, batch: int, process: int,
                  processes: int, accumulation: int) -> list[str]:
    """The prompts of one micro-batch: a seeded permutation per epoch, walked in order across processes."""
    start = ((step * accumulation + micro) * processes + process) * batch
    out = []
    for k in range(start, start + batch):
        epoch, pos = divmod(k, len(prompts))
        order = np.random.default_rng([seed, epoch]).permutation(len(prompts))
        out.append(prompts[order[pos]])
    return out


def hold_out(n_items: int, count: int, seed: int) -> list[int]:
    """Indices of ``count`` held-out items, drawn with the seed (not the first N: files are often sorted)."""
    rng = np.random.default_rng([seed, 0x7A11D])
    return sorted(int(i) for i in rng.choice(n_items, size=count, replace=False))


#: Held-out validation prompts by default (fewer for a small training set: a fifth of it).
DEFAULT_VALIDATION_PROMPTS = 8


def default_validation_count(n_items: int) -> int:
    """8 held-out prompts, or a fifth of a training set of fewer than 40 (at least 1 of 2 or more)."""
    return min(DEFAULT_VALIDATION_PROMPTS, max(1, n_items // 5)) if n_items >= 2 else 0


def split_validation(pool: list[str], spec: int | str | None, seed: int, source: str
                     ) -> tuple[list[str], list[int]]:
    """(validation prompts, indices of the training rows) of ``pool``: ``spec`` is a count of held-out items
    (drawn with the seed and removed from training), a prompts file (its prompts removed from training), or
    None (:func:`default_validation_count`)."""
    if spec is None:
        spec = default_validation_count(len(pool))
    if isinstance(spec, int):
        if spec >= len(pool):
            raise BadConfigError(f"--validation-prompts {spec} would hold out every one of the {len(pool)} "
                                 f"training prompts of {source}: lower it, or give a validation prompts file")
        held = set(hold_out(len(pool), spec, seed)) if spec else set()
        return [pool[i] for i in sorted(held)], [i for i in range(len(pool)) if i not in held]
    validation = load_prompts(spec)
    val = set(validation)
    train_rows = [i for i, p in enumerate(pool) if p not in val]
    if not train_rows:
        raise BadConfigError(f"every training prompt of {source} is also in --validation-prompts {spec}")
    return validation, train_rows

