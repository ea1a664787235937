"""Load shapes as pure functions of run time: ramp, step, spike and soak. No Locust import.

Each answers `(user_count, spawn_rate)` at `t` seconds into the run, or None once the run is
over; `locustfile.py` wraps the chosen one in a Locust `LoadTestShape` whose `tick()` calls
`shape_tick`. `users` is the peak user count, `duration_s` the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Tick = tuple[int, float] | None

RAMP_FRACTION = 0.8          # ramp: reach the peak at 80 % of the run, then hold
NUM_STEPS = 4                # step: the peak in four equal steps
SPIKE_WINDOW = (0.4, 0.6)    # spike: the peak only in the middle fifth of the run
SPIKE_BASE_FRACTION = 0.25   # spike: a quarter of the peak outside it


@dataclass(frozen=True)
class ShapeParams:
    users: int
    spawn_rate: float
    duration_s: float

    def __post_init__(self) -> None:
        if self.users < 1 or self.spawn_rate <= 0 or self.duration_s <= 0:
            raise ValueError(f"a load shape needs users >= 1, spawn_rate > 0 and "
                             f"duration_s > 0, got {self}")


def ramp(params: ShapeParams, t: float) -> Tick:
    fraction = min(1.0, t / (RAMP_FRACTION * params.duration_s))
    return max(1, math.ceil(params.users * fraction)), params.spawn_rate


def step(params: ShapeParams, t: float) -> Tick:
    step_s = params.duration_s / NUM_STEPS
    num_steps = min(NUM_STEPS, int(t // step_s) + 1)
    return max(1, math.ceil(params.users * num_steps / NUM_STEPS)), params.spawn_rate


def spike(params: ShapeParams, t: float) -> Tick:
    start, end = (fraction * params.duration_s for fraction in SPIKE_WINDOW)
    if start <= t < end:
        return params.users, max(params.spawn_rate, float(params.users))
    base = max(1, math.floor(params.users * SPIKE_BASE_FRACTION))
    return base, max(params.spawn_rate, float(params.users))


def soak(params: ShapeParams, t: float) -> Tick:
    return params.users, params.spawn_rate


SHAPES: dict[str, Callable[[ShapeParams, float], Tick]] = {
    "ramp": ramp, "step": step, "spike": spike, "soak": soak,
}


def shape_tick(name: str, params: ShapeParams, t: float) -> Tick:
    """The shape's answer at `t`; None (stop) from `duration_s` on."""
    if name not in SHAPES:
        raise ValueError(f"unknown load shape {name!r}: choose one of {', '.join(SHAPES)}")
    if t >= params.duration_s:
        return None
    return SHAPES[name](params, t)
