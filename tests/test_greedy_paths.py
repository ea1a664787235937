"""The greedy-path comparison the cross-kernel tests rely on (tests/greedy_paths.py)."""

from __future__ import annotations

from tests.greedy_paths import GreedyStep, first_divergence, path_problems

MARGINS = {"near_tie": 0.5, "logprob_tolerance": 0.35}


def step(token: int, *top: tuple[int, float]) -> GreedyStep:
    return GreedyStep(token, dict(top)[token], top)


SAME = step(5, (5, -0.5), (6, -2.0))


def test_identical_paths_agree():
    assert path_problems([SAME, SAME], [SAME, SAME], **MARGINS) == []
    assert first_divergence([SAME, SAME], [SAME, SAME]) is None


def test_a_near_tie_may_part_the_paths_and_nothing_after_it_is_compared():
    tie_a = step(1, (1, -1.0), (2, -1.1))
    tie_b = step(2, (2, -1.0), (1, -1.05))
    unrelated = step(7, (7, -0.1), (8, -4.0))
    assert path_problems([SAME, tie_a, SAME], [SAME, tie_b, unrelated], **MARGINS) == []
    assert first_divergence([SAME, tie_a], [SAME, tie_b]) == 1


def test_a_clear_preference_on_either_side_is_not_a_near_tie():
    tie = step(1, (1, -1.0), (2, -1.1))
    clear = step(2, (2, -0.1), (1, -3.0))
    assert "other prefers 2 over 1 by 2.900" in path_problems([tie], [clear], **MARGINS)[0]
    assert "reference prefers 2 over 1" in path_problems([clear], [tie], **MARGINS)[0]


def test_a_choice_outside_the_other_sides_top_candidates_fails():
    far = step(9, (9, -0.1), (8, -2.0))
    problems = path_problems([far], [SAME], **MARGINS)
    assert problems[0] == "step 0: reference chose 9 and does not have 5 among its top 2"


def test_shared_tokens_with_drifting_logprobs_fail():
    drifted = step(5, (5, -1.5), (6, -2.0))
    assert path_problems([SAME], [drifted], **MARGINS) == [
        "step 0: token 5 has logprob -0.500 vs -1.500 (tolerance 0.35)"]
