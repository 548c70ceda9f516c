"""Split a long prompt into sentence segments (docs/method.md §1.1).

LongAlign encodes every sentence of a prompt on its own. Two splitters are offered:

* ``"sentence"`` (default): real sentence boundaries — ``. ! ? ;`` (and their full-width CJK forms
  ``。 ！ ？ ；``) followed by white space or the end of the text, and line breaks. A full stop inside a number
  (``3.5``), after a common abbreviation (``Mr.``, ``e.g.``) or after a single-letter initial (``J. R. R.``) is
  not a boundary, and nothing inside ``( … )`` splits, so ComfyUI's ``(word:1.2)`` weight syntax survives. A
  ``(`` that is never closed (``so sad :(``) or belongs to an emoticon (``:(`` ``;-)``) is plain text.
  The word ``BREAK`` (upper case, on its own, outside parentheses; A1111's and other ComfyUI packs' "start a new
  chunk here") is an explicit boundary: it ends the segment before it, is itself dropped, and the segment after
  it is marked ``after_break``.
* ``"reference"``: exactly the released LongAlign code (``tools.py``): ``re.split(r'"!|\\.|\\?|;"', prompt)``
  (it splits at every ``.`` and ``?``), ``"."`` appended to every non-empty piece, and the whole prompt as the
  only segment when no piece is left. ``BREAK`` stays text here, as in the release.

Every :class:`Segment` keeps its character span in the original prompt, for display.

A segment longer than the encoder window (75 content tokens for CLIP) is sub-split by :func:`fit_segments`
at clause punctuation, then at word boundaries, then between characters; the reference truncates it instead,
which ``long_segments="truncate"`` reproduces (and reports).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

SplitMode = Literal["sentence", "reference"]
LongSegmentPolicy = Literal["split", "truncate"]

SPLIT_MODES: tuple[str, ...] = ("sentence", "reference")
LONG_SEGMENT_POLICIES: tuple[str, ...] = ("split", "truncate")

#: ``BREAK`` as its own upper-case word (not ``BREAKFAST``, ``break``, ``xBREAK``).
_BREAK_RE = re.compile(r"(?<![\w])BREAK(?![\w])")
#: Emoticons whose parenthesis is not ComfyUI weight syntax.
_EMOTICON_RE = re.compile(r"[:;=][-'^]?[()]")

#: The released code's pattern, kept verbatim: as written it means `"!` or `.` or `?` or `;"`.
REFERENCE_PATTERN = re.compile(r'"!|\.|\?|;"')

_SENTENCE_END = set(".!?;。！？；…")
_ALWAYS_END = set("。！？；")  # CJK sentence marks need no following space
_CLOSERS = set("\"')]}”’»」』")
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "eg", "ie", "fig", "approx",
    "no", "inc", "ltd", "co", "mt", "ft", "vol", "cf", "al", "ca", "lt", "col", "gen", "sgt", "capt", "rev",
}
# Abbreviations that usually also end a sentence when the next word is capitalised.
_SENTENCE_FINAL_ABBREVIATIONS = {"etc", "co", "inc", "ltd"}


@dataclass(frozen=True)
class Segment:
    """One sentence segment of a prompt.

    ``text`` is what gets encoded; ``start``/``end`` is its character span in the original prompt
    (``prompt[start:end]``). In reference mode ``text`` is the source piece plus the appended ``"."``.
    ``part`` and ``parts`` number the pieces of a sentence that had to be sub-split (``parts == 1`` otherwise).
    ``after_break`` is True when an explicit ``BREAK`` ends the text before this segment (sentence mode).
    """

    text: str
    start: int
    end: int
    part: int = 1
    parts: int = 1
    after_break: bool = False


def split_segments(prompt: str, mode: SplitMode = "sentence") -> list[Segment]:
    """Split ``prompt`` into sentence segments.

    Returns at least one segment: an empty or white-space-only prompt gives one empty segment (it encodes to a
    lone start token, exactly as the reference encodes the empty/unconditional prompt, docs/method.md §1.6).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if mode == "reference":
        return _split_reference(prompt)
    if mode == "sentence":
        return _split_sentences(prompt)
    raise ValueError(f"split mode {mode!r} is not one of {SPLIT_MODES}")


def _split_reference(prompt: str) -> list[Segment]:
    segments = []
    pos = 0
    for match in list(REFERENCE_PATTERN.finditer(prompt)) + [None]:
        end = match.start() if match is not None else len(prompt)
        piece = prompt[pos:end]
        if len(piece) > 0:
            segments.append(Segment(piece + ".", pos, end))
        if match is not None:
            pos = match.end()
    if not segments:
        segments = [Segment(prompt, 0, len(prompt))]
    return segments


def _is_boundary(prompt: str, i: int, depth: int) -> int:
    """Return the end index (exclusive) of a sentence ending at ``prompt[i]``, or 0 if ``i`` ends none."""
    ch = prompt[i]
    if ch == "\n":
        return i + 1
    if ch not in _SENTENCE_END or depth > 0:
        return 0
    if i > 0 and prompt[i - 1] == "\\":  # escaped, e.g. ComfyUI's \( \)
        return 0
    j = i + 1
    while j < len(prompt) and (prompt[j] in _SENTENCE_END or prompt[j] in _CLOSERS):
        j += 1
    if ch in _ALWAYS_END:
        return j
    if j < len(prompt) and not prompt[j].isspace():
        return 0  # "3.5", "example.com", "U.S.A"
    if ch == "." and j == i + 1:
        word = re.search(r"([\w.]*)$", prompt[:i]).group(1).lower()
        if len(word) == 1 and word.isalpha():
            return 0  # an initial: "J. R. R. Tolkien"
        if word in _ABBREVIATIONS:
            nxt = re.match(r"\s*(\S)", prompt[j:])
            capitalised_next = nxt is not None and nxt.group(1).isupper()
            if not (word in _SENTENCE_FINAL_ABBREVIATIONS and capitalised_next):
                return 0
    return j


def _bracket_positions(prompt: str) -> set[int]:
    """Indices of the ``(`` and ``)`` that group text (weight syntax): not escaped (``\\(``), not part of an
    emoticon (``:(``, ``;-)``), and matched by a partner; an unmatched one is plain text."""
    emoticon = set()
    for m in _EMOTICON_RE.finditer(prompt):
        emoticon.update(i for i in range(m.start(), m.end()) if prompt[i] in "()")
    opened: list[int] = []
    pairs: set[int] = set()
    for i, ch in enumerate(prompt):
        if ch not in "()" or i in emoticon or (i > 0 and prompt[i - 1] == "\\"):
            continue
        if ch == "(":
            opened.append(i)
        elif opened:
            pairs.update((opened.pop(), i))
    return pairs


def _split_sentences(prompt: str) -> list[Segment]:
    brackets = _bracket_positions(prompt)
    breaks = {m.start(): m.end() for m in _BREAK_RE.finditer(prompt)}
    spans: list[tuple[int, int, bool]] = []  # (start, end, the span follows a BREAK)
    start, depth, i, after_break = 0, 0, 0, False
    while i < len(prompt):
        ch = prompt[i]
        if i in brackets:
            depth += 1 if ch == "(" else -1
        elif depth == 0 and i in breaks:
            spans.append((start, i, after_break))
            start = i = breaks[i]
            after_break = True
            continue
        end = _is_boundary(prompt, i, depth)
        if end:
            spans.append((start, end, after_break))
            start = i = end
            after_break = False
            continue
        i += 1
    spans.append((start, len(prompt), after_break))

    segments: list[Segment] = []
    for s, e, brk in spans:
        while s < e and prompt[s].isspace():
            s += 1
        while e > s and prompt[e - 1].isspace():
            e -= 1
        if s == e:
            continue
        text = prompt[s:e]
        if segments and not brk and not any(c.isalnum() for c in text):
            # A punctuation-only piece ("a cat . . .") joins the sentence before it.
            prev = segments[-1]
            segments[-1] = Segment(prompt[prev.start:e], prev.start, e, after_break=prev.after_break)
            continue
        segments.append(Segment(text, s, e, after_break=brk))
    if not segments:
        segments = [Segment("", 0, 0)]
    return segments


# ------------------------------------------------------------------------------------------------------------
# Fitting segments into the encoder window

_CLAUSE_RE = re.compile(r"[^,;:，、：]*[,;:，、：]*")
_WORD_RE = re.compile(r"\S+\s*|\s+")


def _pieces(text: str, level: int) -> list[str]:
    """Cut ``text`` into consecutive pieces: clauses (level 0), words (1) or characters (2)."""
    if level == 0:
        pieces = [m.group(0) for m in _CLAUSE_RE.finditer(text) if m.group(0)]
    elif level == 1:
        pieces = [m.group(0) for m in _WORD_RE.finditer(text) if m.group(0)]
    else:
        pieces = list(text)
    return pieces


def _pack(text: str, count_tokens: Callable[[str], int], max_tokens: int, level: int) -> list[tuple[int, int]]:
    """Greedy packing of ``text`` into (start, end) ranges of at most ``max_tokens`` tokens each."""
    if count_tokens(text) <= max_tokens or len(text) <= 1:
        return [(0, len(text))]
    if level > 2:
        raise ValueError(f"cannot fit {text!r} into {max_tokens} tokens")
    ranges: list[tuple[int, int]] = []
    cur_start, cur_end, pos = 0, 0, 0
    for piece in _pieces(text, level):
        p_start, p_end = pos, pos + len(piece)
        pos = p_end
        if cur_end > cur_start and count_tokens(text[cur_start:p_end]) > max_tokens:
            ranges.append((cur_start, cur_end))
            cur_start = p_start
        cur_end = p_end
        if count_tokens(text[cur_start:cur_end]) > max_tokens:
            # One piece alone is too long: cut it at the next finer level.
            for s, e in _pack(text[cur_start:cur_end], count_tokens, max_tokens, level + 1):
                ranges.append((cur_start + s, cur_start + e))
            cur_start = cur_end
    if cur_end > cur_start:
        ranges.append((cur_start, cur_end))
    return ranges


def fit_segments(
    segments: Sequence[Segment],
    count_tokens: Callable[[str], int],
    max_tokens: int = 75,
    long_segments: LongSegmentPolicy = "split",
) -> list[Segment]:
    """Make every segment fit the encoder window of ``max_tokens`` content tokens (75 for CLIP: 77 minus the
    start and end tokens).

    ``long_segments="split"`` cuts a longer segment at clause punctuation (``, ; :``), else at word
    boundaries, else between characters, so no token is lost. ``"truncate"`` leaves it whole for the encoder to
    cut at the window, as the reference does; the caller reports the loss.
    """
    if long_segments not in LONG_SEGMENT_POLICIES:
        raise ValueError(f"long_segments {long_segments!r} is not one of {LONG_SEGMENT_POLICIES}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    out: list[Segment] = []
    for seg in segments:
        if long_segments == "truncate" or count_tokens(seg.text) <= max_tokens:
            out.append(seg)
            continue
        ranges = _pack(seg.text, count_tokens, max_tokens, level=0)
        pieces = []
        for s, e in ranges:
            piece = seg.text[s:e]
            lead = len(piece) - len(piece.lstrip())
            stripped = piece.strip()
            if not stripped:
                continue
            # Spans map back to the prompt only when the segment text is a slice of it (sentence mode).
            src_len = seg.end - seg.start
            offset = seg.start + min(s + lead, src_len)
            pieces.append((stripped, offset, min(offset + len(stripped), seg.end)))
        n = len(pieces)
        out.extend(Segment(t, a, b, part=k + 1, parts=n, after_break=seg.after_break and k == 0)
                   for k, (t, a, b) in enumerate(pieces))
    return out


