"""Open-loop arrivals: a Poisson process at a target rate, independent of the answers.

A closed-loop user sends its next request only after the previous answer came back, so a slow
server slows the load down and queueing hides. An open-loop generator sends at its own pace:
arrival times are drawn up front (exponential gaps of mean 1/rate, kept on an absolute
schedule, so a late wake-up is caught up rather than lost) and each arrival is sent at its
time whatever is still in flight. No Locust here; `scenarios.OpenLoopUser` drives it.

Each tenant has its own process (rate split by weight) and its own random stream, merged in
time order: the superposition is again Poisson at the total rate, and with a seed a tenant's
arrivals are the same whatever the other tenants send (a quiet tenant's traffic stays
identical between a fair run and one with a noisy neighbour). The arrival streams are their
own, apart from the streams that pick what each arrival sends: those draw a varying number of
values (a conversation pool's choices depend on which answers came back), which must not move
the arrival times.
"""

from __future__ import annotations

import random

ARRIVAL = "ARRIVAL"        # the Locust entry type of an open-loop arrival (its time: lateness)
ARRIVAL_NAME = "open loop"
DEFAULT_MAX_IN_FLIGHT = 256   # calls in flight past which arrivals are dropped (and counted)


class PoissonArrivals:
    """The arrival times, in the clock's seconds, of a Poisson process from `start`."""

    def __init__(self, rate: float, rng: random.Random, start: float):
        if not rate > 0:
            raise ValueError(f"an arrival rate must be positive, got {rate!r}")
        self.rate = rate
        self.rng = rng
        self.next_at = start + rng.expovariate(rate)

    def advance(self) -> float:
        """The time of the due arrival; the schedule moves on to the one after it."""
        due = self.next_at
        self.next_at = due + self.rng.expovariate(self.rate)
        return due


class MergedArrivals:
    """Independent Poisson processes, one per name, merged: `advance` answers the earliest.
    Each draws from its own stream, `stream_rng(seed, "arrivals/<name>")`."""

    def __init__(self, rates: dict[str, float], seed: int | None, start: float):
        self.processes = {name: PoissonArrivals(rate, stream_rng(seed, f"arrivals/{name}"),
                                                start)
                          for name, rate in rates.items()}

    def advance(self) -> tuple[str, float]:
        """The name whose arrival is due next, and its time."""
        name = min(self.processes, key=lambda n: self.processes[n].next_at)
        return name, self.processes[name].advance()


def stream_rng(seed: int | None, name: str) -> random.Random:
    """A random stream of its own: fixed by (seed, name), or fresh without a seed."""
    return random.Random(f"{seed}/{name}") if seed is not None else random.Random()
