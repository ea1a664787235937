from common import corpus


def test_split_is_deterministic_disjoint_and_complete():
    calibration = list(corpus.documents("calibration"))
    evaluation = list(corpus.documents("evaluation"))
    everything = list(corpus.documents("all"))
    assert calibration == list(corpus.documents("calibration"))
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(everything)
    # Roughly one in five documents is held out, and both parts are real text.
    assert len(everything) // 6 <= len(evaluation) <= len(everything) // 4
    assert sum(map(len, evaluation)) > 50_000
    assert len(set(everything)) == len(everything)
    # Nothing but duplicates is dropped: every paragraph of the topics is still there.
    paragraphs = {para for text in everything for para in text.split("\n\n")}
    assert paragraphs == {para for text in _all_topics() for para in text.split("\n\n")}


def test_unknown_split_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="unknown split 'train'"):
        list(corpus.documents("train"))


def _all_topics():
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items())]
