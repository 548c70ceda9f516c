"""Segment-level encoding through ComfyUI's own ``CLIP`` object (SD1.x, SD2.x, SDXL).

Everything the host does to text keeps working because the host does it: ``clip.tokenize`` parses
``(word:1.2)`` weights and ``embedding:name``; ``clip.encode_from_tokens_scheduled`` applies clip-skip
(``CLIPSetLastLayer``), LoRA patches on the CLIP and scheduled CLIP hooks. This module only decides which
77-token chunks to send (one per segment, all in one batched call) and which positions to keep, then hands the
states to :func:`longalign_core.segment_encoding.merge_segment_states`.

A :class:`SegmentCache` keyed by the CLIP model, its state (``patcher.patches_uuid``, clip-skip, device, dtype)
and each chunk's tokens and weights lets an edit of one sentence re-encode only that sentence; it also keeps the
host tokenizer's chunks per sentence, so only edited sentences are tokenized again.

The ``clip`` argument is duck-typed (``tokenize``, ``encode_from_tokens_scheduled``, ``layer_idx``,
``patcher``, ``cond_stage_model``): nothing here imports ``comfy``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..longalign_core.errors import BadInputError, UnsupportedClipError
from ..longalign_core.segment_encoding import (
    DEFAULT_TOKEN_BUDGET,
    PAD_EMBEDDING_POSITIONS,
    OverflowPolicy,
    PromptReport,
    build_report,
    merge_segment_states,
    padding_embedding,
    plan_segments,
)
from ..longalign_core.clip_vocab import END_ID, START_ID
from ..longalign_core.segmentation import LongSegmentPolicy, SplitMode
from ..longalign_core.out_of_memory import is_out_of_memory
from ..longalign_core.phase_timer import PhaseTimer
from .clip_fastpath import STRUCTURAL_ERRORS, TrimmedClipForward, states_match

log = logging.getLogger("LongAlign")

CHUNK = 77
#: Token streams of CLIP text encoders this node understands (ComfyUI tokenizer keys).
SUPPORTED_KEYS = {"l": "SD1.x CLIP-L", "h": "SD2.x OpenCLIP-H", "g": "SDXL OpenCLIP-bigG"}

Chunk = list  # 77 tuples (token, weight[, word_id]); token is an int id or an embedding tensor/dict

#: Largest prompt weight accepted: ``(word:w)`` scales a state's difference from the empty prompt by w, so far
#: beyond this the conditioning leaves anything the model saw (and near 1e38 it overflows to inf).
MAX_PROMPT_WEIGHT = 100.0


def _check_weights(tokens: dict[str, list[Chunk]], text: str) -> None:
    """Refuse a prompt weight that is not a finite number of sensible size, naming the sentence: ComfyUI's own
    encode would silently turn ``(word:nan)`` or ``(word:1e309)`` into a NaN/inf conditioning."""
    for chunks in tokens.values():
        for chunk in chunks:
            for entry in chunk:
                w = float(entry[1])
                if not math.isfinite(w) or abs(w) > MAX_PROMPT_WEIGHT:
                    raise BadInputError(
                        f"LongAlign Text Encode: a prompt weight of {w:g} in {text.strip()[:80]!r} is not a finite "
                        f"number within ±{MAX_PROMPT_WEIGHT:g}; write weights like (word:1.2) (0.5–1.5 is usual)")


def _first_end(chunk: Chunk) -> int:
    """Index of the first end token of a chunk (= start token + content count); the whole chunk if none."""
    for i, entry in enumerate(chunk):
        tok = entry[0]
        if type(tok) is int:  # the common case, without the slow abstract-class check below
            if tok == END_ID:
                return i
        elif isinstance(tok, numbers.Integral) and int(tok) == END_ID:
            return i
    return len(chunk)


def _token_key(entry) -> Any:
    tok, weight = entry[0], float(entry[1])
    if isinstance(tok, numbers.Integral):
        return int(tok), weight
    if torch.is_tensor(tok):
        return hashlib.sha1(tok.detach().float().cpu().numpy().tobytes()).hexdigest(), weight
    return repr(tok), weight


def _chunk_key(chunks_by_key: dict[str, Chunk]) -> tuple:
    """Tokens and weights of a chunk up to its first end token: CLIP is causal, so what follows (padding) changes
    neither the kept states nor the pooled output at the end token."""
    return tuple((k, tuple(_token_key(e) for e in c[: _first_end(c) + 1]))
                 for k, c in sorted(chunks_by_key.items()))


@dataclass
class _Entry:
    kept: torch.Tensor  # (K, C) states at the kept positions (start token + content)
    pooled: torch.Tensor | None  # pooled output when this chunk was first in its batch, else None


@dataclass
class FastPathVerdict:
    """Whether the trimmed forward may be used for one CLIP model and state (:meth:`SegmentCache.state_key`), and
    what it was checked on.

    ``usable`` turns False for good only on a mismatch with the host or a structural error (the host's modules
    are not what the trimmed forward expects); a transient error (out of memory) leaves it alone.
    ``checked_width``: the empty prompt, packed behind real segments, matched the host's own encode in this
    state over its first ``checked_width`` positions (checked on the first trimmed forward of the state, and
    again, wider, when a later prompt needs more positions than any before). ``checked``: the rules already
    compared with the host's own encode on real rows (``"weights"``: a row with prompt weights;
    ``"embeddings"``: a row with textual-inversion embeddings), each on the first prompt of the state that uses
    it.
    """

    usable: bool = True
    checked_width: int = 0
    checked: set[str] = field(default_factory=set)
    reason: str = ""

    @property
    def verified(self) -> bool:
        """The trimmed forward was checked against the host in this state (and passed)."""
        return self.usable and self.checked_width > 0


class SegmentCache:
    """LRU cache of encoded segment chunks, per CLIP model (held weakly) and state; also the host tokenizer's
    chunks per sentence, per tokenizer (held weakly) and tokenizer options.

    Key: (:meth:`state_key`, chunk tokens + weights up to the end token). Only kept positions are stored.
    """

    def __init__(self, max_entries: int = 2048, max_texts: int = 4096):
        self.max_entries = max_entries
        self.max_texts = max_texts
        self._models: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
        self._verdicts: "weakref.WeakKeyDictionary[Any, dict[tuple, FastPathVerdict]]" = weakref.WeakKeyDictionary()
        self._texts: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _table(self, clip) -> OrderedDict:
        model = clip.cond_stage_model
        with self._lock:
            table = self._models.get(model)
            if table is None:
                table = OrderedDict()
                self._models[model] = table
            return table

    @staticmethod
    def state_key(clip) -> tuple:
        """What the encoded states depend on besides the model object and the tokens: its patches (LoRA, compute
        dtype: ``patches_uuid`` changes with each), clip skip, execution device and weight dtypes."""
        patcher = getattr(clip, "patcher", None)
        dtypes = sorted({str(p.dtype) for p in clip.cond_stage_model.parameters()})
        return (str(getattr(patcher, "patches_uuid", None)), getattr(clip, "layer_idx", None),
                str(getattr(patcher, "load_device", None)), tuple(dtypes))

    def tokens(self, clip, text: str, tokenize: Callable[[str], Any]):
        """The host tokenizer's chunks of ``text``, from ``tokenize(text)`` once per tokenizer and options.
        A text naming a textual-inversion embedding is tokenized every time (the file may change on disk)."""
        tokenizer = getattr(clip, "tokenizer", None)
        if tokenizer is None or "embedding:" in text.lower():
            return tokenize(text)
        key = (repr(sorted(getattr(clip, "tokenizer_options", {}).items())), text)
        with self._lock:
            table = self._texts.get(tokenizer)
            if table is None:
                table = self._texts[tokenizer] = OrderedDict()
            found = table.get(key)
            if found is not None:
                table.move_to_end(key)
                return found
        found = tokenize(text)
        with self._lock:
            table[key] = found
            while len(table) > self.max_texts:
                table.popitem(last=False)
        return found

    def get(self, clip, key: tuple, count: bool = True) -> _Entry | None:
        """The entry for ``key`` or None; ``count`` adds the lookup to the segment hit/miss statistics."""
        table = self._table(clip)
        with self._lock:
            entry = table.get(key)
            if entry is not None:
                table.move_to_end(key)
            if count:
                self.hits += entry is not None
                self.misses += entry is None
            return entry

    def put(self, clip, key: tuple, entry: _Entry) -> None:
        table = self._table(clip)
        with self._lock:
            table[key] = entry
            table.move_to_end(key)
            while len(table) > self.max_entries:
                table.popitem(last=False)

    def verdict(self, clip, state: tuple) -> FastPathVerdict:
        """The trimmed-forward verdict for ``clip``'s model in patch state ``state`` (created usable)."""
        with self._lock:
            per_model = self._verdicts.setdefault(clip.cond_stage_model, {})
            return per_model.setdefault(state, FastPathVerdict())

    def clear(self, segments_only: bool = False) -> None:
        """Forget everything, or (``segments_only``) the encoded sentences and their tokens but not what is known
        per model state (the empty prompt's states, the trimmed-forward verdicts)."""
        with self._lock:
            if segments_only:
                for table in self._models.values():
                    for key in [k for k in table if k[-1] != "<empty>"]:
                        del table[key]
            else:
                self._models = weakref.WeakKeyDictionary()
                self._verdicts = weakref.WeakKeyDictionary()
            self._texts = weakref.WeakKeyDictionary()
            self.hits = self.misses = 0


def _uses_clip_hooks(clip) -> bool:
    return bool(getattr(clip, "use_clip_schedule", False)) and getattr(getattr(clip, "patcher", None),
                                                                        "forced_hooks", None) is not None


class HostClipSegments:
    """Segment-level encoding of one prompt through a ComfyUI ``CLIP`` object."""

    def __init__(self, clip, cache: SegmentCache | None = None,
                 check_interrupt: Callable[[], None] | None = None, fast: bool = True,
                 phases: PhaseTimer | None = None):
        self.clip = clip
        self.cache = cache if cache is not None else SegmentCache()  # None: nothing reused between calls
        self.fast = fast
        self.check_interrupt = check_interrupt or (lambda: None)
        self.phases = phases if phases is not None else PhaseTimer(enabled=False)  # bench/encode.py's profile
        with self.phases("tokenize"):
            empty = self.cache.tokens(clip, "", clip.tokenize)
        if not isinstance(empty, dict) or not empty:
            raise UnsupportedClipError("LongAlign Text Encode: this CLIP's tokenizer did not return ComfyUI token "
                                       "chunks. Use the model's own text-encode node.")
        unknown = [k for k in empty if k not in SUPPORTED_KEYS]
        if unknown:
            raise UnsupportedClipError(
                f"LongAlign Text Encode works with CLIP text encoders ({', '.join(f'{k}: {v}' for k, v in SUPPORTED_KEYS.items())}); "
                f"this model's text encoder has streams {sorted(empty)}. Use the model's own text-encode node.")
        for k, chunks in empty.items():
            if len(chunks) != 1 or len(chunks[0]) != CHUNK or chunks[0][0][0] != START_ID:
                raise UnsupportedClipError(f"LongAlign Text Encode: unexpected token layout for stream {k!r} "
                                           f"(expected 77-token chunks starting with the start token). Use the "
                                           f"model's own text-encode node.")
        self.keys = sorted(empty)
        self.primary = "l" if "l" in empty else self.keys[0]
        self._empty = empty
        self._tokens: dict[str, dict[str, list[Chunk]]] = {}
        self._counts: dict[str, int] = {}

    # -- tokens -------------------------------------------------------------------------------------------------
    def _tokenize_checked(self, text: str) -> dict[str, list[Chunk]]:
        tokens = self.clip.tokenize(text)
        _check_weights(tokens, text)
        counts = {k: len(tokens[k]) for k in self.keys}
        if len(set(counts.values())) != 1:
            raise ValueError(f"token streams disagree on chunk count for {text!r}: {counts}")
        return tokens

    def tokenize(self, text: str) -> dict[str, list[Chunk]]:
        tokens = self._tokens.get(text)
        if tokens is None:
            with self.phases("tokenize"):
                tokens = self.cache.tokens(self.clip, text, self._tokenize_checked)
            self._tokens[text] = tokens
        return tokens

    def count_tokens(self, text: str) -> int:
        """Content positions (start/end/pad excluded) the host makes of ``text``, over all its chunks."""
        count = self._counts.get(text)
        if count is None:
            count = self._counts[text] = sum(_first_end(c) - 1 for c in self.tokenize(text)[self.primary])
        return count

    # -- encoding -----------------------------------------------------------------------------------------------
    def _encode_chunks(self, chunk_list: list[dict[str, Chunk]]) -> list[tuple[torch.Tensor, dict]]:
        """One host call for all chunks → per conditioning entry, ``(n, 77, C)`` states and the host's dict."""
        tokens = {k: [c[k] for c in chunk_list] for k in self.keys}
        out = self.clip.encode_from_tokens_scheduled(tokens)
        result = []
        for cond, extra in out:
            if cond.shape[1] != CHUNK * len(chunk_list):
                raise ValueError(f"host returned {cond.shape[1]} positions for {len(chunk_list)} chunks of {CHUNK}")
            result.append((cond[0].reshape(len(chunk_list), CHUNK, cond.shape[-1]), extra))
        return result

    def encode(
        self,
        prompt: str,
        budget: int = DEFAULT_TOKEN_BUDGET,
        overflow: OverflowPolicy = "extend",
        split_mode: SplitMode = "sentence",
        long_segments: LongSegmentPolicy = "split",
    ) -> tuple[list[list], PromptReport]:
        """CONDITIONING ``[[cond (1, L, C), {"pooled_output": …, …}], …]`` and the report for ``prompt``.

        The pooled output is the first segment's (the host likewise pools the first chunk of a long prompt).
        """
        with self.phases("plan"):
            plan = plan_segments(prompt, self.count_tokens, CHUNK - 2, split_mode, long_segments)
            seg_chunks = [{k: self.tokenize(s.text)[k][0] for k in self.keys} for s in plan]  # truncate: 1st
            counts = [self.count_tokens(s.text) for s in plan]
            kept_len = [_first_end(c[self.primary]) for c in seg_chunks]
        self.check_interrupt()

        if _uses_clip_hooks(self.clip):
            entries = self._encode_all(seg_chunks)
        else:
            entries = [self._encode_cached(seg_chunks)]

        with self.phases("merge"):
            conditioning = []
            report = None
            width = max(kept_len)
            for seg_states, pad, extra in entries:
                channels = pad.shape[-1]
                states = torch.zeros(len(plan), width, channels, dtype=pad.dtype, device=pad.device)
                keep = torch.zeros(len(plan), width, dtype=torch.bool)
                for i, (kept, n) in enumerate(zip(seg_states, kept_len)):
                    states[i, :n] = kept[:n]
                    keep[i, :n] = True
                result = merge_segment_states(states, keep, [0] * len(plan), pad, budget, overflow,
                                              num_prompts=1)
                conditioning.append([result.cond, extra])
                if report is None:
                    report = build_report(plan, counts, result.merged[0], result.dropped[0],
                                          result.padding[0], budget, overflow, CHUNK - 2)
        return conditioning, report

    def _encode_all(self, seg_chunks):
        """CLIP hooks present: the host schedules them, so segments + the empty prompt go in one host call."""
        empty = {k: self._empty[k][0] for k in self.keys}
        out = []
        with self.phases("host encode"):
            host_out = self._encode_chunks(seg_chunks + [empty])
        for states, extra in host_out:
            pad = padding_embedding(states[-1], PAD_EMBEDDING_POSITIONS)
            out.append((list(states[:-1]), pad, dict(extra)))
        return out

    def _empty_states(self, state: tuple) -> torch.Tensor:
        """The host's own full encode of the empty prompt ``(77, C)``: source of ``<pad*>``, the reference
        for prompt weights and the check of the trimmed forward."""
        key = state + ("<empty>",)
        entry = self.cache.get(self.clip, key, count=False)
        if entry is None:
            with self.phases("host encode (empty prompt, once per model state)"):
                (states, _), = self._encode_chunks([{k: self._empty[k][0] for k in self.keys}])
            entry = _Entry(states[0].clone(), None)
            self.cache.put(self.clip, key, entry)
        return entry.kept

    def _encode_rows(self, state: tuple, rows: list[dict[str, Chunk]], empty: torch.Tensor, want_pooled: bool):
        """Encode chunk rows: trimmed forward when the host model allows and passes its check, else the host."""
        verdict = self.cache.verdict(self.clip, state)
        if self.fast and verdict.usable:
            trimmed = TrimmedClipForward(self.clip, self.keys)
            reason = trimmed.unsupported_reason()
            if reason is None:
                try:
                    result = self._encode_trimmed_checked(trimmed, rows, empty, want_pooled, verdict)
                    if result is not None:
                        return result
                    reason = verdict.reason
                except STRUCTURAL_ERRORS as exc:  # the host's internals are not what the trimmed forward expects
                    if is_out_of_memory(exc):  # transient: this call goes through the host, the next tries again
                        log.warning("LongAlign: trimmed CLIP forward ran out of memory; this prompt is encoded "
                                    "through the CLIP object")
                        reason = None
                    else:
                        reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                verdict.usable, verdict.reason = False, reason
                log.info("LongAlign: trimmed CLIP forward not used (%s); encoding through the CLIP object", reason)
        with self.phases("host encode"):
            (states, extra), = self._encode_chunks(rows)
        return states, extra.get("pooled_output")

    def _encode_trimmed_checked(self, trimmed: TrimmedClipForward, rows: list[dict[str, Chunk]],
                                empty: torch.Tensor, want_pooled: bool, verdict: FastPathVerdict):
        """Trimmed forward of ``rows``, checked against the host's own encode once per model state: on the first
        call of a state (and on a later one that needs more positions than any before) the empty prompt goes
        along as one more segment as wide as the widest row, packed behind the real segments (so the check also
        covers the packing: positions counted per segment, each segment seeing only itself); the first row with
        prompt weights and the first with embeddings are encoded by the host too and compared. Returns None
        (reason in ``verdict``) on a mismatch."""
        to_check = {}
        for i, row in enumerate(rows):
            entries = [e for k in self.keys for e in row[k][: _first_end(row[k]) + 1]]
            if "weights" not in verdict.checked and "weights" not in to_check \
                    and any(float(e[1]) != 1.0 for e in entries):
                to_check["weights"] = i
            if "embeddings" not in verdict.checked and "embeddings" not in to_check \
                    and any(not isinstance(e[0], numbers.Integral) for e in entries):
                to_check["embeddings"] = i
        # Positions each row needs: start + content; the end token too where pooled or compared with the host.
        widths = [min(_first_end(row[self.primary]) + (1 if i in to_check.values() or (i == 0 and want_pooled)
                                                       else 0), CHUNK)
                  for i, row in enumerate(rows)]
        check_width = max(widths + [2]) if max(widths) > verdict.checked_width else 0  # 2: start + end token
        if check_width:
            rows = rows + [{k: self._empty[k][0] for k in self.keys}]
            widths.append(check_width)
        with self.phases("trimmed forward"):
            states, pooled = trimmed.encode(rows, widths, empty, want_pooled)
        with self.phases("checks against the host (once per model state)"):
            if check_width:
                if not states_match(states[-1, :check_width], empty[:check_width]):
                    verdict.reason = "its result differs from the host's encode of the empty prompt"
                    return None
                states, rows = states[:-1], rows[:-1]
            if to_check:
                order = sorted(set(to_check.values()))
                (host_states, _), = self._encode_chunks([rows[i] for i in order])
                for what, i in to_check.items():
                    n = widths[i]  # start, content and end token (pooled position)
                    if not states_match(states[i, :n], host_states[order.index(i), :n]):
                        verdict.reason = f"its result differs from the host's encode of a row with {what}"
                        return None
                verdict.checked.update(to_check)
            verdict.checked_width = max(verdict.checked_width, check_width)
        return states, pooled

    def _encode_cached(self, seg_chunks):
        cache, clip = self.cache, self.clip
        with self.phases("cache look-ups"):
            state = SegmentCache.state_key(clip)
        empty = self._empty_states(state)
        with self.phases("cache look-ups"):
            keys = [state + _chunk_key(c) for c in seg_chunks]
            found = [cache.get(clip, k) for k in keys]
        # Pooled output comes from the first row of a call: the first segment goes first when its pooled is missing.
        need_first = found[0] is None or found[0].pooled is None
        todo = [i for i, e in enumerate(found) if e is None or (i == 0 and need_first)]
        if todo:
            states, pooled = self._encode_rows(state, [seg_chunks[i] for i in todo], empty, todo[0] == 0)
            with self.phases("cache look-ups"):
                for j, i in enumerate(todo):
                    n = _first_end(seg_chunks[i][self.primary])
                    entry = _Entry(states[j, :n].clone(), pooled if j == 0 and i == 0 else None)
                    cache.put(clip, keys[i], entry)
                    found[i] = entry
        extra = {"pooled_output": found[0].pooled}
        add_hooks = getattr(clip, "add_hooks_to_dict", None)
        if callable(add_hooks):
            extra = add_hooks(extra)
        return [e.kept for e in found], padding_embedding(empty, PAD_EMBEDDING_POSITIONS), extra


__all__ = ["FastPathVerdict", "HostClipSegments", "SegmentCache", "UnsupportedClipError",
           "SUPPORTED_KEYS"]
