"""Open-loop arrivals are a Poisson process: exponential gaps of mean 1/rate, on an absolute
schedule that does not drift with when the generator wakes up."""

from __future__ import annotations

import random
import statistics

import pytest

from loadtests.arrivals import MergedArrivals, PoissonArrivals, stream_rng


def test_gaps_are_exponential_with_mean_one_over_the_rate():
    arrivals = PoissonArrivals(rate=20.0, rng=random.Random(11), start=100.0)
    times = [arrivals.advance() for _ in range(20_000)]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert times[0] > 100.0 and all(gap >= 0 for gap in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.03)
    # exponential: the standard deviation equals the mean, a third of the gaps are past it
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)
    assert sum(gap > 1 / 20 for gap in gaps) / len(gaps) == pytest.approx(0.368, abs=0.02)


def test_the_count_in_a_window_matches_the_rate():
    arrivals = PoissonArrivals(rate=5.0, rng=random.Random(12), start=0.0)
    times = []
    while (due := arrivals.advance()) < 2_000.0:
        times.append(due)
    assert len(times) == pytest.approx(10_000, rel=0.03)


def test_the_schedule_repeats_with_a_seed():
    first = PoissonArrivals(3.0, random.Random(5), start=0.0)
    second = PoissonArrivals(3.0, random.Random(5), start=0.0)
    assert [first.advance() for _ in range(50)] == [second.advance() for _ in range(50)]


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan")])
def test_a_rate_must_be_positive(rate):
    with pytest.raises(ValueError, match="must be positive"):
        PoissonArrivals(rate, random.Random(), start=0.0)


def merged_times(rates: dict[str, float], seed: int, until: float) -> dict[str, list[float]]:
    arrivals = MergedArrivals(rates, seed, 0.0)
    times: dict[str, list[float]] = {name: [] for name in rates}
    last = 0.0
    while (item := arrivals.advance())[1] < until:
        name, due = item
        assert due >= last   # merged in time order
        times[name].append(due)
        last = due
    return times


def test_tenants_arrive_at_their_share_of_the_rate_in_time_order():
    times = merged_times({"quiet": 1.0, "noisy": 10.0}, seed=3, until=1_000.0)
    assert len(times["quiet"]) == pytest.approx(1_000, rel=0.1)
    assert len(times["noisy"]) == pytest.approx(10_000, rel=0.05)


def test_with_a_seed_a_tenants_arrivals_do_not_depend_on_its_neighbours():
    fair = merged_times({"quiet": 1.0, "noisy": 1.0}, seed=9, until=100.0)
    noisy = merged_times({"quiet": 1.0, "noisy": 10.0}, seed=9, until=100.0)
    assert fair["quiet"] == noisy["quiet"]
    assert len(noisy["noisy"]) > 5 * len(fair["noisy"])


def test_arrival_times_have_a_stream_apart_from_what_arrivals_send():
    """The open loop draws each arrival's workload and prompt from `stream_rng(seed, tenant)`,
    a varying number of values (conversation pools depend on answers): the arrival times come
    from a stream of their own, so those draws cannot move them."""
    merged = MergedArrivals({"quiet": 2.0}, 4, 0.0)
    own = PoissonArrivals(2.0, stream_rng(4, "arrivals/quiet"), 0.0)
    shared = PoissonArrivals(2.0, stream_rng(4, "quiet"), 0.0)
    times = [merged.advance()[1] for _ in range(50)]
    assert times == [own.advance() for _ in range(50)]
    assert times != [shared.advance() for _ in range(50)]
