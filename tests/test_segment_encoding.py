"""Segment-level encoding against independent computations through transformers."""

import re

import pytest
import torch

from longalign_core import CLIPSegmentEncoder, merge_segment_states, padding_embedding, split_segments

START, END = 49406, 49407

LONG_PROMPT = (
    "A weathered lighthouse stands on a basalt cliff at dusk. Waves crash against the rocks below, throwing "
    "white spray into the air! A keeper in a yellow raincoat climbs the spiral stairs; he carries a brass "
    "lantern. Gulls circle the lamp room. The sky fades from orange to deep violet, and the first stars appear. "
    "In the foreground, a wooden rowing boat is tied to a rusted iron ring. Fishing nets hang drying on a "
    "fence. A black cat sleeps on an upturned crate. Mr. Alvarez, the old fisherman, mends a net by "
    "lantern light. His dog, a scruffy terrier, watches the sea. Smoke rises from the chimney of a small "
    "cottage. A path of flat stones leads up to the door. Wildflowers grow between the stones. Far out at "
    "sea, a cargo ship's lights blink."
)


def independent_segment_states(tokenizer, model, text):
    """One segment on its own, padded to 77 (not to the batch's longest): start + content states."""
    ids = tokenizer(text, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = model(ids).last_hidden_state[0]
    n = int((ids[0] == END).nonzero()[0])  # first end token = 1 + content tokens
    return states[:n]


def independent_pad(tokenizer, model):
    ids = tokenizer([""], max_length=77, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).last_hidden_state[0, -60:].mean(0)


def expected_cond(tokenizer, model, prompt, budget=240):
    parts = [independent_segment_states(tokenizer, model, s.text) for s in split_segments(prompt)]
    merged = torch.cat(parts)
    pad = independent_pad(tokenizer, model)
    length = max(budget, -(-merged.shape[0] // budget) * budget)
    return torch.cat([merged, pad.expand(length - merged.shape[0], -1)])


def test_merged_states_equal_independent_per_segment_encodes(segment_encoder, clip_tokenizer, tiny_text_encoder):
    prompts = [LONG_PROMPT, "A cat. A dog.", "one sentence without a full stop"]
    out = segment_encoder.encode(prompts)
    assert out.cond.shape == (3, 240, 32)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(out.cond[b], expected_cond(clip_tokenizer, tiny_text_encoder, p),
                                   atol=1e-5, rtol=1e-5)


def test_start_tokens_kept_end_and_pad_dropped(segment_encoder, clip_tokenizer, tiny_text_encoder):
    prompt = "A cat. A dog sits. Birds fly."
    out = segment_encoder.encode(prompt)
    report = out.reports[0]
    n_seg = len(report.segments)
    assert n_seg == 3 and report.merged == n_seg + report.content_tokens
    # CLIP is causal: every segment's start-token state is the same vector, found exactly once per segment.
    start_state = independent_segment_states(clip_tokenizer, tiny_text_encoder, "x")[0]
    is_start = (out.cond[0] - start_state).abs().amax(-1) < 1e-5
    starts = is_start.nonzero().flatten().tolist()
    expected_starts, pos = [], 0
    for s in report.segments:
        expected_starts.append(pos)
        pos += 1 + s.tokens
    assert starts == expected_starts
    # No end-token state survives: compare with each segment's end-token state.
    for s in split_segments(prompt):
        ids = clip_tokenizer(s.text, return_tensors="pt").input_ids
        with torch.no_grad():
            end_state = tiny_text_encoder(ids).last_hidden_state[0, -1]
        assert ((out.cond[0, :report.merged] - end_state).abs().amax(-1) > 1e-4).all()


def test_padding_vector_is_mean_of_last_60_empty_states(segment_encoder, clip_tokenizer, tiny_text_encoder):
    pad = independent_pad(clip_tokenizer, tiny_text_encoder)
    torch.testing.assert_close(segment_encoder.padding_embedding(), pad)
    out = segment_encoder.encode("A cat.")
    merged = out.reports[0].merged
    torch.testing.assert_close(out.cond[0, merged:], pad.expand(240 - merged, -1))


def test_short_prompt_equals_plain_encode(segment_encoder, clip_tokenizer, tiny_text_encoder):
    prompt = "a photograph of an astronaut riding a horse"
    ids = clip_tokenizer(prompt, max_length=77, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = tiny_text_encoder(ids).last_hidden_state[0]
    n = int((ids[0] == END).nonzero()[0])
    out = segment_encoder.encode(prompt)
    torch.testing.assert_close(out.cond[0, :n], plain[:n], atol=1e-5, rtol=1e-5)


def test_segment_order_is_preserved(segment_encoder):
    a, b = "A red cube.", "A green sphere."
    ab = segment_encoder.encode(f"{a} {b}").cond[0]
    ba = segment_encoder.encode(f"{b} {a}").cond[0]
    na = segment_encoder.count_tokens(a) + 1
    nb = segment_encoder.count_tokens(b) + 1
    torch.testing.assert_close(ab[:na], ba[nb:nb + na])
    torch.testing.assert_close(ab[na:na + nb], ba[:nb])
    assert not torch.allclose(ab[:na + nb], ba[:na + nb])


def test_empty_prompt_is_start_token_plus_padding(segment_encoder, clip_tokenizer, tiny_text_encoder):
    for prompt in ["", "   \n "]:
        out = segment_encoder.encode(prompt)
        start = independent_segment_states(clip_tokenizer, tiny_text_encoder, "")
        assert start.shape[0] == 1
        torch.testing.assert_close(out.cond[0, 0], start[0])
        torch.testing.assert_close(out.cond[0, 1:], independent_pad(clip_tokenizer, tiny_text_encoder).expand(239, -1))
        assert out.reports[0].merged == 1


@pytest.mark.parametrize("prompt", ["...!?", "一只橘猫在窗台上晒太阳。窗外是樱花。", "🐱🐶🦊 emoji parade! 🎉🎉"])
def test_unusual_text_encodes_losslessly(segment_encoder, clip_tokenizer, tiny_text_encoder, prompt):
    out = segment_encoder.encode(prompt)
    assert out.reports[0].lossless
    assert out.reports[0].content_tokens == sum(segment_encoder.count_tokens(s.text) for s in split_segments(prompt))
    torch.testing.assert_close(out.cond[0], expected_cond(clip_tokenizer, tiny_text_encoder, prompt),
                               atol=1e-5, rtol=1e-5)


def test_10k_token_prompt_extends_without_loss(segment_encoder):
    sentence = "a small {} house with a red roof and {} windows stands near the river"
    prompt = " ".join(sentence.format(i, i + 1) + "." for i in range(600))
    n_tokens = segment_encoder.count_tokens(prompt)
    assert n_tokens > 10_000
    out = segment_encoder.encode(prompt)
    r = out.reports[0]
    assert r.lossless and r.content_tokens == n_tokens
    assert r.length % 240 == 0 and r.length >= r.merged and out.cond.shape[1] == r.length
    assert any("extended" in w for w in r.warnings())


def test_overflow_policies(segment_encoder):
    prompt = " ".join(f"Sentence {i} talks about a blue teapot on a table." for i in range(30))
    ext = segment_encoder.encode(prompt, budget=240, overflow="extend")
    cut = segment_encoder.encode(prompt, budget=240, overflow="truncate")
    r_ext, r_cut = ext.reports[0], cut.reports[0]
    assert r_ext.merged > 240 and ext.cond.shape[1] == 480 and r_ext.dropped == 0
    assert cut.cond.shape[1] == 240 and r_cut.dropped == r_cut.merged - 240
    torch.testing.assert_close(cut.cond[0], ext.cond[0, :240])
    assert not r_cut.lossless and "cut at the token budget" in " ".join(r_cut.format().split())
    with pytest.raises(ValueError, match=r"needs \d+ tokens but the token budget is 240"):
        segment_encoder.encode(prompt, overflow="error")
    with pytest.raises(ValueError, match="extend"):
        segment_encoder.encode(prompt, overflow="drop")


def test_batch_of_prompts_pads_to_longest(segment_encoder):
    long = " ".join(f"Sentence {i} talks about a blue teapot on a table." for i in range(30))
    out = segment_encoder.encode([long, "short."])
    assert out.cond.shape[1] == 480
    assert out.reports[1].padding == 480 - out.reports[1].merged


def test_long_sentence_split_vs_reference_truncation(segment_encoder):
    sentence = ", ".join(f"detail {i} of the carved wooden door" for i in range(20)) + "."
    n = segment_encoder.count_tokens(sentence)
    split = segment_encoder.encode(sentence).reports[0]
    trunc = segment_encoder.encode(sentence, long_segments="truncate").reports[0]
    assert split.lossless and split.content_tokens == n and len(split.segments) > 1
    assert trunc.truncated == n - 75 and not trunc.lossless
    assert "cut from segments longer than the encoder window" in " ".join(trunc.format().split())


def test_one_forward_for_all_segments_of_all_prompts(clip_tokenizer, tiny_text_encoder):
    enc = CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder)
    enc.padding_embedding()
    calls = []
    handle = tiny_text_encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        enc.encode([LONG_PROMPT, "A cat. A dog. A cow.", ""])
    finally:
        handle.remove()
    assert len(calls) == 1


def test_clip_skip_uses_penultimate_layer_with_final_norm(clip_tokenizer, tiny_text_encoder):
    enc = CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder, clip_skip=1)
    prompt = "A cat on a mat."
    ids = clip_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        h = tiny_text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(tiny_text_encoder, "text_model", tiny_text_encoder).final_layer_norm(h)[0, :-1]
    torch.testing.assert_close(enc.encode(prompt).cond[0, :ids.shape[1] - 1], expected)
    with pytest.raises(ValueError, match="clip_skip"):
        CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder, clip_skip=5)


def test_dtype_is_kept(clip_tokenizer, tiny_text_encoder):
    import copy

    model = copy.deepcopy(tiny_text_encoder).to(torch.bfloat16)
    out = CLIPSegmentEncoder(clip_tokenizer, model).encode("A cat. A dog.")
    assert out.cond.dtype == torch.bfloat16


def reference_caption2embed(captions, tokenizer, model, token_length=240):
    """The released ``tools.caption2embed`` CLIP branch, re-written from the published algorithm."""
    pattern = re.compile(r'"!|\.|\?|;"')
    sentences, index = [], []
    for ic, caption in enumerate(captions):
        pieces = [s + "." for s in re.split(pattern, caption) if len(s) > 0] or [caption]
        sentences += pieces
        index += [ic] * len(pieces)
    tok = tokenizer(sentences, max_length=77, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = model(tok.input_ids)[0]
    index = torch.tensor(index)
    pad_ids = tokenizer([""], max_length=77, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        pad = model(pad_ids)[0][0, -60:].mean(dim=0, keepdim=True)
    out = []
    for i in range(len(captions)):
        e = states[index == i]
        ids = tok.input_ids[index == i]
        m = (ids != tokenizer.pad_token_id) * (ids != tokenizer.eos_token_id)
        cat = e.reshape(-1, e.shape[-1])[m.reshape(-1)]
        if len(cat) > token_length:
            cat = cat[:token_length]
        else:
            cat = torch.cat([cat, pad.repeat(token_length - len(cat), 1)])
        out.append(cat)
    return torch.stack(out)


def test_reference_settings_reproduce_released_code(clip_tokenizer, tiny_text_encoder):
    enc = CLIPSegmentEncoder(clip_tokenizer, tiny_text_encoder)
    long_sentence = " ".join(["word"] * 90) + ". Short one? 3.5 Mr. X; ok"
    over_budget = " ".join(f"Sentence {i} talks about a blue teapot on a table." for i in range(30))
    captions = [LONG_PROMPT, long_sentence, "", over_budget]
    ours = enc.encode(captions, split_mode="reference", long_segments="truncate", overflow="truncate").cond
    torch.testing.assert_close(ours, reference_caption2embed(captions, clip_tokenizer, tiny_text_encoder),
                               atol=1e-5, rtol=1e-5)


def test_merge_validates_inputs():
    states = torch.zeros(2, 5, 4)
    keep = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="prompt_of_row"):
        merge_segment_states(states, keep, [0], torch.zeros(4))
    with pytest.raises(ValueError, match="channels"):
        merge_segment_states(states, keep, [0, 0], torch.zeros(3))
    with pytest.raises(ValueError, match="budget"):
        merge_segment_states(states, keep, [0, 0], torch.zeros(4), budget=0)
    with pytest.raises(ValueError, match=r"\(T, C\)"):
        padding_embedding(torch.zeros(77))


def test_keep_mask_drops_padding_by_position_not_id():
    from longalign_core import keep_mask_before_end

    ids = torch.tensor([[49406, 0, 320, 49407, 0, 0],     # "!" (id 0) is real content before the end token
                        [49406, 320, 49407, 49407, 49407, 49407],
                        [49406, 320, 321, 322, 323, 324]])  # truncated: no end token, all kept
    keep = keep_mask_before_end(ids, 49407)
    assert keep.tolist() == [[True, True, True, False, False, False],
                             [True, True, False, False, False, False],
                             [True] * 6]


# ----------------------------------------------------------------------------------------------------------------
# The report a user reads in Preview as Text, and the counts the node outputs


def test_report_counts_and_break_marks(segment_encoder, clip_tokenizer):
    prompt = "A red fox in the snow. A blue bird on a wire BREAK an owl, asleep. " + "word " * 90
    out = segment_encoder.encode(prompt, budget=77, overflow="extend").reports[0]
    # independent: the tokenizer's own count per expected segment (the 90 words sub-split into 75 + 15)
    pieces = ["A red fox in the snow.", "A blue bird on a wire", "an owl, asleep."]
    content = [len(clip_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in pieces] + [75, 15]
    assert [s.tokens for s in out.segments] == content
    assert out.merged == sum(content) + 5 and out.length == 77 * -(-out.merged // 77)
    assert [s.after_break for s in out.segments] == [False, False, True, False, False]
    lines = out.format().splitlines()
    assert lines[0] == f"5 segments, {out.merged} tokens, budget 77"
    rows = [ln for ln in lines if re.match(r"^ *\d+ +\d+  ", ln)]
    assert len(rows) == 5
    assert [int(r.split()[1]) for r in rows] == content
    assert rows[2].split(None, 2)[2].startswith("BREAK an owl") and "BREAK" not in rows[1]
    assert rows[3].endswith("[1/2]") and rows[4].endswith("[2/2]")


@pytest.mark.parametrize("width", [40, 48, 60])
def test_report_lines_fit_the_width_and_mark_trimmed_text(segment_encoder, width):
    prompt = LONG_PROMPT + " " + ", ".join(f"detail {i} of the carved wooden door" for i in range(20)) + "."
    report = segment_encoder.encode(prompt, budget=120, overflow="truncate", long_segments="truncate").reports[0]
    text = report.format(width)
    assert all(len(line) <= width for line in text.splitlines()), text
    rows = [ln for ln in text.splitlines() if re.match(r"^ *\d+ +\d+  ", ln)]
    assert len(rows) == len(report.segments)
    for row, seg in zip(rows, report.segments):
        shown = row.split(None, 2)[2]
        for tag in (f" [-{seg.truncated} cut]",):
            shown = shown[: -len(tag)] if seg.truncated and shown.endswith(tag) else shown
        if shown.endswith("…"):  # trimmed: what is shown is the start of the sentence
            assert seg.text.startswith(shown[:-1]) and len(seg.text) > len(shown) - 1
        else:
            assert shown == seg.text
    assert any(r.endswith("…") for r in rows) and any(r.endswith("cut]") for r in rows)
    # warnings are wrapped, not lost
    flat = " ".join(text.split())
    for warning in report.warnings():
        assert " ".join(("WARNING: " + warning).split()) in flat


def test_packed_rows_place_every_segment_once_without_overlap():
    from longalign_core.segment_encoding import pack_segments

    widths = [17, 16, 17, 14, 15, 19, 13, 17, 16, 14, 17, 16, 15, 16]  # the built-in prompt's segments
    packed = pack_segments(widths)
    assert (packed.rows, packed.width) == (1, sum(widths))  # 222 positions fit one row: no padding at all
    many = pack_segments([60] * 10, max_width=256)
    assert many.rows == 3 and many.width <= 256
    for layout in (packed, many):
        used = set()
        for (row, offset), w in zip(layout.placement, layout.widths):
            slots = {(row, offset + j) for j in range(w)}
            assert not slots & used and offset + w <= layout.width
            used |= slots
    wide = pack_segments([300, 5], max_width=256)  # wider than a row: a row of its own width
    assert wide.width == 300 and wide.placement[0][1] == 0


def test_packed_mask_and_positions_written_out():
    from longalign_core.segment_encoding import pack_segments

    layout = pack_segments([2, 3], max_width=8)
    assert layout.placement == [(0, 0), (0, 2)] and layout.width == 5
    assert layout.positions().tolist() == [[0, 1, 0, 1, 2]]
    allowed = (layout.attention_mask()[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 1, 1, 1]]


def test_packed_attention_equals_each_segment_alone():
    """Attention over packed rows with the block mask gives each segment what causal attention over it alone
    gives (torch's own causal attention per segment is the independent side)."""
    from longalign_core.segment_encoding import pack_segments

    torch.manual_seed(0)
    widths = [5, 9, 3, 7, 9, 2]
    layout = pack_segments(widths, max_width=16)
    assert layout.rows > 1
    heads, dim = 2, 8
    alone = [torch.randn(3, heads, w, dim) for w in widths]  # q, k, v of each segment
    packed = torch.zeros(3, layout.rows, heads, layout.width, dim)
    for (row, offset), w, qkv in zip(layout.placement, widths, alone):
        packed[:, row, :, offset:offset + w] = qkv
    out = torch.nn.functional.scaled_dot_product_attention(*packed, attn_mask=layout.attention_mask())
    for (row, offset), w, (q, k, v) in zip(layout.placement, widths, alone):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out[row, :, offset:offset + w], want, atol=1e-6, rtol=1e-5)
