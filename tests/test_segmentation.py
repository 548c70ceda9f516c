import re

import pytest

from longalign_core import fit_segments, split_segments
from longalign_core.segmentation import Segment


def reference_split(caption):
    """The released code's split, written out independently (LongAlign tools.py, collate_fn/caption2embed)."""
    pattern = re.compile(r'"!|\.|\?|;"')
    pieces = [s + "." for s in re.split(pattern, caption) if len(s) > 0]
    return pieces or [caption]


@pytest.mark.parametrize("caption", [
    "A cat. A dog? A bird! A fish; the end.",
    "It costs 3.5 dollars. Mr. Smith agrees",
    'She said "hi"! Then; "left" ...',
    "",
    "...",
    "no punctuation at all",
    " leading space. trailing space. ",
    "multi\nline. text",
])
def test_reference_mode_reproduces_released_split(caption):
    segs = split_segments(caption, mode="reference")
    assert [s.text for s in segs] == reference_split(caption)
    for s in segs:
        if s.text != caption:
            assert caption[s.start:s.end] + "." == s.text


def texts(prompt, **kw):
    return [s.text for s in split_segments(prompt, **kw)]


def test_sentence_boundaries():
    assert texts("A red fox. A blue bird! Is it? Yes; really.") == [
        "A red fox.", "A blue bird!", "Is it?", "Yes;", "really."]


def test_no_split_inside_numbers_abbreviations_initials_urls():
    prompt = "It is 3.5 m tall, e.g. a tree. Mr. Smith and J. R. R. Tolkien visit example.com today. Next."
    assert texts(prompt) == ["It is 3.5 m tall, e.g. a tree.",
                             "Mr. Smith and J. R. R. Tolkien visit example.com today.", "Next."]


def test_line_breaks_and_cjk_and_quotes():
    assert texts("first line\nsecond line") == ["first line", "second line"]
    assert texts("一只猫坐在椅子上。窗外下着雨！") == ["一只猫坐在椅子上。", "窗外下着雨！"]
    assert texts('He said "stop." Then left.') == ['He said "stop."', "Then left."]


def test_weight_syntax_is_not_split():
    assert texts("(a red cat. a blue dog:1.2) sits. Done.") == ["(a red cat. a blue dog:1.2) sits.", "Done."]
    assert texts(r"a \(literal. paren\) here") == [r"a \(literal.", r"paren\) here"]


def test_spans_point_into_prompt():
    prompt = "  One sentence here.   Two!\n\nThree; 3.5 four.  "
    segs = split_segments(prompt)
    assert [s.text for s in segs] == ["One sentence here.", "Two!", "Three;", "3.5 four."]
    for s in segs:
        assert prompt[s.start:s.end] == s.text


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_is_one_empty_segment(prompt):
    assert split_segments(prompt) == [Segment("", 0, 0)]


def test_punctuation_only_pieces_join_previous_sentence():
    assert texts("a cat . . . a dog.") == ["a cat . . .", "a dog."]
    assert texts("...") == ["..."]
    assert texts("!!! ??? ...") == ["!!! ??? ..."]


def test_emoji_kept():
    assert texts("A cat 🐱 naps. 🎉 Party!") == ["A cat 🐱 naps.", "🎉 Party!"]


def test_bad_mode_and_type():
    with pytest.raises(ValueError, match="sentence"):
        split_segments("x", mode="nltk")
    with pytest.raises(TypeError):
        split_segments(None)


def words(text):
    return text.split()


def test_long_sentence_is_subsplit_without_loss(clip_tokenizer):
    count = lambda t: len(clip_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    clauses = [f"clause number {i} describes a small detail of the scene with some colour" for i in range(12)]
    sentence = ", ".join(clauses) + "."
    assert count(sentence) > 75
    out = fit_segments(split_segments(sentence), count, 75)
    assert len(out) > 1
    assert all(count(s.text) <= 75 for s in out)
    assert [w for s in out for w in words(s.text)] == words(sentence)
    assert all(s.parts == len(out) for s in out) and [s.part for s in out] == list(range(1, len(out) + 1))
    # Clause boundaries are preferred: every piece but the last ends at a comma.
    assert all(s.text.endswith(",") for s in out[:-1])
    for s in out:
        assert sentence[s.start:s.end] == s.text


def test_wordless_run_is_split_between_characters(clip_tokenizer):
    count = lambda t: len(clip_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    run = "猫" * 200 + "🐱" * 50
    out = fit_segments(split_segments(run), count, 75)
    assert all(count(s.text) <= 75 for s in out)
    assert "".join(s.text for s in out) == run


def test_truncate_policy_keeps_segment_whole(clip_tokenizer):
    count = lambda t: len(clip_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    sentence = "word " * 100
    out = fit_segments(split_segments(sentence), count, 75, long_segments="truncate")
    assert len(out) == 1 and count(out[0].text) == 100
    with pytest.raises(ValueError, match="split"):
        fit_segments(out, count, 75, long_segments="drop")
