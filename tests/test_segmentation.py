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


@pytest.mark.parametrize("prompt, expected", [
    ("Apples, pears etc. The sky is blue.", ["Apples, pears etc.", "The sky is blue."]),
    ("Made by Acme Inc. The logo is red.", ["Made by Acme Inc.", "The logo is red."]),
    ("Apples, pears etc. and plums on a plate.", ["Apples, pears etc. and plums on a plate."]),
    ("Made by Acme Co. in 1950. Done.", ["Made by Acme Co. in 1950.", "Done."]),
    ("Mr. Smith waves.", ["Mr. Smith waves."]),
])
def test_etc_inc_co_ltd_end_a_sentence_only_before_a_capital(prompt, expected):
    """"etc." / "Inc." / "Co." / "Ltd." usually end the sentence when a capitalised word follows, and not before
    a lower-case one; other abbreviations ("Mr.") never end one."""
    assert texts(prompt) == expected


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


# ----------------------------------------------------------------------------------------------------------------
# BREAK (explicit boundary in sentence mode) and parentheses that are not weight syntax


def test_break_is_an_explicit_boundary_in_sentence_mode():
    prompt = "a red fox, in snow BREAK a blue bird on a wire. An owl BREAK"
    segs = split_segments(prompt)
    assert [s.text for s in segs] == ["a red fox, in snow", "a blue bird on a wire.", "An owl"]
    assert [s.after_break for s in segs] == [False, True, False]
    for s in segs:  # the keyword itself is in no segment; the spans still point into the prompt
        assert prompt[s.start:s.end] == s.text and "BREAK" not in s.text


def test_break_only_as_an_upper_case_word_outside_parentheses():
    assert texts("BREAKFAST at the break of day, xBREAK and BREAK_1.") == [
        "BREAKFAST at the break of day, xBREAK and BREAK_1."]
    assert texts("(a cat BREAK a dog:1.2) sit") == ["(a cat BREAK a dog:1.2) sit"]
    assert texts("a cat\nBREAK\na dog") == ["a cat", "a dog"]
    assert texts("BREAK BREAK a dog BREAK") == ["a dog"]


def test_reference_mode_leaves_break_as_text():
    assert texts("a cat BREAK a dog. end", mode="reference") == ["a cat BREAK a dog.", " end."]


def test_break_mark_survives_subsplitting(clip_tokenizer):
    count = lambda t: len(clip_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    long_clause = ", ".join(f"detail {i} of the scene" for i in range(30))
    out = fit_segments(split_segments("intro BREAK " + long_clause), count, 75)
    assert out[0].text == "intro" and not out[0].after_break
    assert out[1].after_break and out[1].part == 1 and out[1].parts > 1
    assert not any(s.after_break for s in out[2:])


@pytest.mark.parametrize("prompt, expected", [
    # issue 11: an early ":(" made the rest of the prompt one parenthesised segment
    ("so sad :( today. A dog runs. A cat sleeps.", ["so sad :( today.", "A dog runs.", "A cat sleeps."]),
    ("wink ;-) here. (a red cat. a blue dog:1.2) sits. Done.",
     ["wink ;-) here.", "(a red cat. a blue dog:1.2) sits.", "Done."]),
    ("an unclosed ( paren. Next one. Last.", ["an unclosed ( paren.", "Next one.", "Last."]),
    ("a stray ) here. (kept. together:0.8) end.", ["a stray ) here.", "(kept. together:0.8) end."]),
])
def test_unmatched_and_emoticon_parentheses_do_not_swallow_the_prompt(prompt, expected):
    assert texts(prompt) == expected
