"""IncrementalDetokenizer never emits a broken character; StopChecker cuts exactly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.handlers.detokenizer import IncrementalDetokenizer, StopChecker

MULTIBYTE = "héllo wörld 世界 🎉 naïve café ok"


def push_one_by_one(tokenizer, token_ids, **kwargs) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detokenizer.push([token_id]) for token_id in token_ids] + [detokenizer.flush()]


def test_multibyte_characters_split_over_tokens_are_never_broken(tiny_tokenizer):
    token_ids = tiny_tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    assert len(token_ids) > len(MULTIBYTE.split())  # some characters span several tokens
    pieces = push_one_by_one(tiny_tokenizer, token_ids)
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # held back while a character was incomplete


def test_special_tokens_skipped_or_kept(tiny_tokenizer):
    token_ids = [*tiny_tokenizer.encode("Hi there", add_special_tokens=False), 2]
    assert "".join(push_one_by_one(tiny_tokenizer, token_ids)) == "Hi there"
    kept = push_one_by_one(tiny_tokenizer, token_ids, skip_special_tokens=False)
    assert "".join(kept) == "Hi there<|im_end|>"


def test_prompt_context_is_not_emitted(tiny_tokenizer):
    prompt = tiny_tokenizer.encode("Say:", add_special_tokens=False)
    output = tiny_tokenizer.encode(" yes", add_special_tokens=False)
    pieces = push_one_by_one(tiny_tokenizer, output, prompt_token_ids=prompt)
    assert "".join(pieces) == " yes"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_concatenation_equals_decode_of_any_text(tiny_tokenizer, text):
    token_ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    pieces = push_one_by_one(tiny_tokenizer, token_ids)
    assert "".join(pieces) == tiny_tokenizer.decode(token_ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=200, deadline=None)
@given(token_ids=st.lists(st.integers(3, 2047), max_size=30))
def test_concatenation_equals_decode_of_any_token_ids(tiny_tokenizer, token_ids):
    assert "".join(push_one_by_one(tiny_tokenizer, token_ids)) == \
        tiny_tokenizer.decode(token_ids)


def run_checker(stop: list[str], chunks: list[str]) -> tuple[str, bool]:
    checker = StopChecker(stop)
    out = "".join(checker.push(chunk) for chunk in chunks)
    return out + checker.flush(), checker.stopped


def reference(stop: list[str], chunks: list[str]) -> tuple[str, bool]:
    """After each chunk, the earliest stop string in everything so far ends the text."""
    text = ""
    for chunk in chunks:
        text += chunk
        found = [text.find(s) for s in stop if s and s in text]
        if found:
            return text[:min(found)], True
    return text, False


def test_stop_string_across_chunks_is_cut_exactly():
    assert run_checker(["END"], ["abc E", "N", "Dxyz"]) == ("abc ", True)
    assert run_checker(["END"], ["abc EN", "d"]) == ("abc ENd", False)
    checker = StopChecker(["\n\n"])
    assert checker.push("line\n") == "line"  # "\n" held back: it may start the stop string
    assert checker.push("more") == "\nmore"


@settings(max_examples=500, deadline=None)
@given(stop=st.lists(st.text("ab\n", min_size=1, max_size=4), max_size=3),
       chunks=st.lists(st.text("abc\n", max_size=5), max_size=8))
def test_stop_checker_matches_reference(stop, chunks):
    assert run_checker(stop, chunks) == reference(stop, chunks)
