"""Segment-level long-prompt conditioning, host-independent (docs/method.md §1.2–1.6).

The pieces every front-end (transformers here, ComfyUI's CLIP object in ``nodes/``) composes:

1. :func:`plan_segments` — split a prompt into sentence segments that fit the encoder window.
2. the front-end encodes all segments of all prompts in **one batched forward** → states ``(N, T, C)`` and a
   ``keep`` mask ``(N, T)`` that is True at each segment's start token and content tokens (end and pad dropped).
3. :func:`merge_segment_states` — concatenate the kept states per prompt, in segment order, and pad with the
   padding embedding ``<pad*>`` (:func:`padding_embedding`) to the token budget; overflow is never silent.
4. :class:`PromptReport` — what happened to each prompt, readable by people.

Symbols: B prompts, N segments over all prompts, T positions per segment row, C channels, L output tokens.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from .errors import BadInputError
from .segmentation import LongSegmentPolicy, Segment, SplitMode, fit_segments, split_segments

OverflowPolicy = Literal["extend", "truncate", "error"]
OVERFLOW_POLICIES: tuple[str, ...] = ("extend", "truncate", "error")

#: Token budget of the released LongSD model (reference ``--token_length 240``).
DEFAULT_TOKEN_BUDGET = 240
#: The padding embedding is the mean of the last 60 hidden states of the encoded empty prompt (reference).
PAD_EMBEDDING_POSITIONS = 60
#: CLIP's window: 77 positions minus the start and end tokens.
CLIP_WINDOW = 75
#: Characters per line of :meth:`PromptReport.format`: what a 420 px wide *Preview as Text* shows unwrapped.
REPORT_WIDTH = 48


def plan_segments(
    prompt: str,
    count_tokens: Callable[[str], int],
    window: int = CLIP_WINDOW,
    split_mode: SplitMode = "sentence",
    long_segments: LongSegmentPolicy = "split",
) -> list[Segment]:
    """Sentence segments of ``prompt`` that each fit ``window`` content tokens (docs/method.md §1.1).

    ``count_tokens(text)`` returns the number of content tokens (no start/end) the encoder sees for ``text``.
    """
    return fit_segments(split_segments(prompt, split_mode), count_tokens, window, long_segments)


def padding_embedding(empty_prompt_states: torch.Tensor, positions: int = PAD_EMBEDDING_POSITIONS) -> torch.Tensor:
    """``<pad*>``: the mean of the last ``positions`` hidden states of the encoded empty prompt (docs/method.md §1.4).

    ``empty_prompt_states``: ``(T, C)`` states of ``[sot, eot, pad, …]`` padded to the full window (T = 77).
    Returns ``(C,)`` in the input dtype.
    """
    if empty_prompt_states.ndim != 2:
        raise ValueError(f"expected empty-prompt states of shape (T, C), got {tuple(empty_prompt_states.shape)}")
    if not 1 <= positions <= empty_prompt_states.shape[0]:
        raise ValueError(f"positions must be in 1..{empty_prompt_states.shape[0]}, got {positions}")
    return empty_prompt_states[-positions:].float().mean(dim=0).to(empty_prompt_states.dtype)


def keep_mask_before_end(token_ids: torch.Tensor, end_token_id: int) -> torch.Tensor:
    """``(N, T)`` mask that keeps every position before the first end token of each row: the start token and
    the content tokens. Works by position, so a pad id that is also a real token (SD2/SDXL pad with 0 = ``!``)
    is handled; a row without an end token (truncated) is kept whole."""
    is_end = token_ids == end_token_id
    has_end = is_end.any(dim=1, keepdim=True)
    first_end = torch.where(has_end, is_end.int().argmax(dim=1, keepdim=True), token_ids.shape[1])
    positions = torch.arange(token_ids.shape[1], device=token_ids.device).unsqueeze(0)
    return positions < first_end


#: Widest packed row (positions) of :func:`pack_segments`: attention over a row costs its width squared, so
#: segments share rows up to this width and more rows are made beyond it.
PACKED_ROW_WIDTH = 256


@dataclass
class PackedRows:
    """Where each of N segments sits when segments share rows (sequence packing, docs/method.md §1.2).

    A causal text encoder run over a packed row with :meth:`attention_mask` (each position sees only the earlier
    positions of its own segment) and :meth:`positions` (each segment counts its positions from 0) gives every
    segment the states it gets alone, without padding every segment to the longest one.
    ``placement[i]``: (row, offset) of segment i; ``widths[i]``: its positions; R rows of ``width`` positions.
    """

    placement: list[tuple[int, int]]
    widths: list[int]
    rows: int
    width: int

    def segment_ids(self) -> torch.Tensor:
        """``(R, W)`` the segment index at each slot; an unused slot gets its own negative id (it sees only itself)."""
        ids = -1 - torch.arange(self.rows * self.width).reshape(self.rows, self.width)
        for i, ((row, offset), w) in enumerate(zip(self.placement, self.widths)):
            ids[row, offset:offset + w] = i
        return ids

    def positions(self) -> torch.Tensor:
        """``(R, W)`` each slot's position inside its segment (0 for unused slots)."""
        pos = torch.zeros(self.rows, self.width, dtype=torch.long)
        for (row, offset), w in zip(self.placement, self.widths):
            pos[row, offset:offset + w] = torch.arange(w)
        return pos

    def attention_mask(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """``(R, 1, W, W)`` additive mask: 0 where query slot q may attend key slot k (same segment, k not after
        q), ``-finfo(dtype).max`` elsewhere: the causal mask of each segment, block by block."""
        ids, pos = self.segment_ids(), self.positions()
        allowed = (ids[:, :, None] == ids[:, None, :]) & (pos[:, None, :] <= pos[:, :, None])
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, -torch.finfo(dtype).max)
        return mask.unsqueeze(1).to(device)


def pack_segments(widths: Sequence[int], max_width: int = PACKED_ROW_WIDTH) -> PackedRows:
    """Pack segments of ``widths`` positions into as few rows as ``max_width`` allows (first-fit decreasing),
    each row as narrow as that count of rows permits; inside a row segments keep their input order.

    A segment wider than ``max_width`` gets a row of its own width.
    """
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"segment widths must be >= 1, got {widths}")
    if max_width < 1:
        raise ValueError(f"max_width must be >= 1, got {max_width}")
    total = sum(widths)
    rows = max(1, math.ceil(total / max(max_width, max(widths))))
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    capacity = max(max(widths), math.ceil(total / rows))
    while True:  # capacity grows until the rows hold everything (at worst one row of the total)
        fill = [0] * rows
        members: list[list[int]] = [[] for _ in range(rows)]
        for i in order:
            row = next((r for r in range(rows) if fill[r] + widths[i] <= capacity), None)
            if row is None:
                break
            fill[row] += widths[i]
            members[row].append(i)
        else:
            break
        capacity += 1
    placement: list[tuple[int, int]] = [(0, 0)] * len(widths)
    for row, items in enumerate(members):
        offset = 0
        for i in sorted(items):
            placement[i] = (row, offset)
            offset += widths[i]
    used = [m for m in range(rows) if members[m]]
    remap = {r: k for k, r in enumerate(used)}
    placement = [(remap[r], o) for r, o in placement]
    return PackedRows(placement, widths, len(used), max(fill))


class TokenBudgetError(BadInputError):
    """``overflow="error"`` and a prompt needs more tokens than the budget; front-ends may reword it with their
    own option names from ``prompt_index``, ``needed`` and ``budget``."""

    def __init__(self, prompt_index: int, needed: int, budget: int):
        self.prompt_index, self.needed, self.budget = prompt_index, needed, budget
        super().__init__(
            f"prompt {prompt_index} needs {needed} tokens but the token budget is {budget}: raise the budget to at "
            f"least {needed}, shorten the prompt, or choose overflow 'extend' (grow the budget) or 'truncate' (cut, "
            f"as the reference does)")


@dataclass
class MergeResult:
    """Output of :func:`merge_segment_states`: ``cond`` ``(B, L, C)``; per prompt the merged token count
    before padding/truncation (``merged``), the tokens cut by ``overflow="truncate"`` (``dropped``) and the
    padding appended (``padding``)."""

    cond: torch.Tensor
    merged: list[int]
    dropped: list[int]
    padding: list[int]


def output_length(merged: int, budget: int, overflow: OverflowPolicy) -> int:
    """Length of one prompt's conditioning: the budget, or with ``overflow="extend"`` the smallest multiple of
    the budget that holds every merged token (whole multiples keep positive and negative batchable in ComfyUI,
    which repeats a shorter cond only to a common multiple)."""
    if overflow == "extend":
        return budget * max(1, math.ceil(merged / budget))
    return budget


def merge_segment_states(
    states: torch.Tensor,
    keep: torch.Tensor,
    prompt_of_row: Sequence[int],
    pad: torch.Tensor,
    budget: int = DEFAULT_TOKEN_BUDGET,
    overflow: OverflowPolicy = "extend",
    num_prompts: int | None = None,
) -> MergeResult:
    """Merge per-segment hidden states into one conditioning per prompt (docs/method.md §1.3–1.5).

    states: ``(N, T, C)`` one row per segment, rows of a prompt in segment order.
    keep: ``(N, T)`` bool, True for positions to keep (each segment's start token and content tokens).
    prompt_of_row: length N, the prompt index of each row (0..B-1).
    pad: ``(C,)`` padding embedding.
    overflow: ``"extend"`` grows the length to the next multiple of ``budget``; ``"truncate"`` keeps the first
    ``budget`` tokens (reference); ``"error"`` raises. All prompts of a batch get the longest length.
    Returns ``(B, L, C)`` in the dtype/device of ``states``.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow {overflow!r} is not one of {OVERFLOW_POLICIES}")
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    if states.ndim != 3 or keep.shape != states.shape[:2]:
        raise ValueError(f"states (N, T, C) and keep (N, T) disagree: {tuple(states.shape)} vs {tuple(keep.shape)}")
    if len(prompt_of_row) != states.shape[0]:
        raise ValueError(f"prompt_of_row has {len(prompt_of_row)} entries for {states.shape[0]} segment rows")
    if pad.shape != states.shape[-1:]:
        raise ValueError(f"padding embedding {tuple(pad.shape)} does not match channels {states.shape[-1]}")
    num_prompts = (max(prompt_of_row) + 1 if len(prompt_of_row) else 0) if num_prompts is None else num_prompts

    rows_of: list[list[int]] = [[] for _ in range(num_prompts)]
    for row, p in enumerate(prompt_of_row):
        rows_of[p].append(row)
    keep = keep.to(states.device)
    merged_states = [states[rows][keep[rows]] for rows in rows_of]  # each (M_b, C)
    merged = [m.shape[0] for m in merged_states]

    if overflow == "error":
        over = [(b, m) for b, m in enumerate(merged) if m > budget]
        if over:
            b, m = over[0]
            raise TokenBudgetError(b, m, budget)
    length = max(output_length(m, budget, overflow) for m in merged) if merged else budget

    pad = pad.to(device=states.device, dtype=states.dtype)
    cond = pad.expand(num_prompts, length, -1).clone()
    dropped, padding = [], []
    for b, m in enumerate(merged_states):
        n = min(m.shape[0], length)
        cond[b, :n] = m[:n]
        dropped.append(m.shape[0] - n)
        padding.append(length - n)
    return MergeResult(cond, merged, dropped, padding)


# ------------------------------------------------------------------------------------------------------------
# Reports


@dataclass
class SegmentInfo:
    """One encoded segment: its text and span, the content tokens kept, and tokens lost to the window
    (only with ``long_segments="truncate"``); ``after_break`` when an explicit ``BREAK`` precedes it."""

    text: str
    start: int
    end: int
    tokens: int
    truncated: int = 0
    part: int = 1
    parts: int = 1
    after_break: bool = False


@dataclass
class PromptReport:
    """What segment-level encoding did with one prompt."""

    segments: list[SegmentInfo]
    budget: int
    overflow: str
    merged: int  # start tokens + content tokens before padding/truncation
    length: int  # final conditioning length
    dropped: int = 0  # merged tokens cut by overflow="truncate"
    padding: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def content_tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    @property
    def truncated(self) -> int:
        return sum(s.truncated for s in self.segments)

    @property
    def lossless(self) -> bool:
        """True when every token of the prompt reached the conditioning."""
        return self.dropped == 0 and self.truncated == 0

    def warnings(self) -> list[str]:
        out = []
        if self.truncated:
            out.append(f"{self.truncated} tokens cut from segments longer than the encoder window "
                       f"(long segments: truncate)")
        if self.dropped:
            first_lost = self._first_lost_segment()
            out.append(f"{self.dropped} tokens cut at the token budget {self.budget} (overflow: truncate); "
                       f"lost from segment {first_lost} on")
        if self.overflow == "extend" and self.length > self.budget:
            out.append(f"budget {self.budget} extended to {self.length} tokens to hold all {self.merged} "
                       f"(the released LongSD model was trained at 240)")
        return out

    def _first_lost_segment(self) -> int:
        used = 0
        for k, s in enumerate(self.segments, 1):
            used += 1 + s.tokens
            if used > self.length:
                return k
        return len(self.segments)

    def format(self, width: int = REPORT_WIDTH) -> str:
        """A table no wider than ``width`` characters, so it reads in a 420 px *Preview as Text* without
        wrapping: two summary lines, one line per segment (number, tokens, text trimmed with ``…``), then
        warnings and notes wrapped at word boundaries.

        Segment lines: ``BREAK`` before the text marks a segment that an explicit ``BREAK`` started,
        ``[2/3]`` after it the part of a sentence longer than the window, ``[-12 cut]`` tokens cut from it.
        """
        n = len(self.segments)
        lines = [f"{n} segment{'s' if n != 1 else ''}, {self.merged} tokens, budget {self.budget}",
                 f"({self.content_tokens} text + {n} start); cond {self.length}"
                 + (f" = {self.merged - self.dropped} + {self.padding} pad" if self.padding else "")]
        lines.append(f"{'#':>3} {'tok':>3}  text")
        for k, s in enumerate(self.segments, 1):
            head = f"{k:>3} {s.tokens:>3}  " + ("BREAK " if s.after_break else "")
            tags = (f" [{s.part}/{s.parts}]" if s.parts > 1 else "") + (f" [-{s.truncated} cut]" if s.truncated else "")
            room = max(width - len(head) - len(tags), 8)
            text = " ".join(s.text.split())  # line breaks and runs of spaces shown as one space
            if len(text) > room:
                text = text[: room - 1].rstrip() + "…"
            lines.append(head + text + tags)
        for prefix, items in (("WARNING: ", self.warnings()), ("note: ", self.notes)):
            for item in items:
                lines += textwrap.wrap(prefix + item, width, subsequent_indent="  ", break_long_words=True)
        return "\n".join(lines)


def build_report(
    segments: Sequence[Segment],
    content_tokens: Sequence[int],
    result_merged: int,
    result_dropped: int,
    result_padding: int,
    budget: int,
    overflow: str,
    window: int = CLIP_WINDOW,
) -> PromptReport:
    """Assemble a :class:`PromptReport` for one prompt from its segments and their full token counts."""
    infos = []
    for seg, n in zip(segments, content_tokens):
        kept = min(n, window)
        infos.append(SegmentInfo(seg.text, seg.start, seg.end, kept, n - kept, seg.part, seg.parts,
                                 seg.after_break))
    subsplit = sum(1 for s in segments if s.part == 1 and s.parts > 1)
    notes = [f"{subsplit} sentence(s) longer than {window} tokens were split at clause or word boundaries"] \
        if subsplit else []
    length = result_merged - result_dropped + result_padding
    return PromptReport(infos, budget, overflow, result_merged, length, result_dropped, result_padding, notes)


@dataclass
class BatchPlan:
    """The segments of a batch of prompts in encoding order, with each segment's full content-token count."""

    plans: list[list[Segment]]
    counts: list[list[int]]

    @property
    def texts(self) -> list[str]:
        """Every segment's text, prompt by prompt: one encoder row each."""
        return [s.text for plan in self.plans for s in plan]

    @property
    def owner(self) -> list[int]:
        """The prompt index of each row of :attr:`texts` (``prompt_of_row`` of :func:`merge_segment_states`)."""
        return [b for b, plan in enumerate(self.plans) for _ in plan]

    def reports(self, result: MergeResult, budget: int, overflow: str, window: int) -> list[PromptReport]:
        return [build_report(plan, counts, result.merged[b], result.dropped[b], result.padding[b], budget,
                             overflow, window)
                for b, (plan, counts) in enumerate(zip(self.plans, self.counts))]


def plan_batch(
    prompts: str | Sequence[str],
    count_tokens: Callable[[str], int],
    window: int = CLIP_WINDOW,
    split_mode: SplitMode = "sentence",
    long_segments: LongSegmentPolicy = "split",
) -> BatchPlan:
    """:func:`plan_segments` for a batch (one prompt or a list), counting each distinct text once."""
    from .errors import BadInputError, kind_of

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise BadInputError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BadInputError(f"prompt {i} is {kind_of(p)} ({p!r:.40}), not a string")
    memo: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in memo:
            memo[text] = count_tokens(text)
        return memo[text]

    plans = [plan_segments(p, count, window, split_mode, long_segments) for p in prompts]
    return BatchPlan(plans, [[count(s.text) for s in plan] for plan in plans])
