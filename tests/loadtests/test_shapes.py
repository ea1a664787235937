"""Load shapes: user counts over time, a stop at the end, and the locustfile's selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loadtests.shapes import ShapeParams, shape_tick

PARAMS = ShapeParams(users=8, spawn_rate=2.0, duration_s=100.0)


def users_over_time(name: str) -> list[int | None]:
    ticks = [shape_tick(name, PARAMS, t) for t in range(0, 101, 10)]
    return [tick[0] if tick else None for tick in ticks]


def test_ramp_grows_to_the_peak_then_holds_then_stops():
    assert users_over_time("ramp") == [1, 1, 2, 3, 4, 5, 6, 7, 8, 8, None]


def test_step_climbs_in_four_steps():
    assert users_over_time("step") == [2, 2, 2, 4, 4, 6, 6, 6, 8, 8, None]


def test_spike_jumps_to_the_peak_in_the_middle_fifth_only():
    assert users_over_time("spike") == [2, 2, 2, 2, 8, 8, 2, 2, 2, 2, None]
    assert shape_tick("spike", PARAMS, 45.0) == (8, 8.0)   # spawned at once


def test_soak_holds_the_peak_for_the_whole_run():
    assert users_over_time("soak") == [8] * 10 + [None]
    assert shape_tick("soak", PARAMS, 99.9) == (8, 2.0)


def test_unknown_shape_and_bad_params_are_errors():
    with pytest.raises(ValueError, match="unknown load shape 'wave'"):
        shape_tick("wave", PARAMS, 0.0)
    with pytest.raises(ValueError, match="users >= 1"):
        ShapeParams(users=0, spawn_rate=1.0, duration_s=10.0)


TICK_SCRIPT = """
import json, sys, time
import locust  # first, as `locust` itself does: it patches the process with gevent
sys.path.insert(0, {root!r})
import importlib.util
spec = importlib.util.spec_from_file_location("locustfile", {root!r} + "/loadtests/locustfile.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from locust.util.load_locustfile import is_shape_class, is_user_class
shapes = [v for v in vars(module).values() if is_shape_class(v)]
users = [v.__name__ for v in vars(module).values() if is_user_class(v)]
out = {{"shapes": [s.__name__ for s in shapes], "users": users}}
if shapes:
    shape = shapes[0]()
    ticks = []
    for t in (0.0, 50.0, 99.0, 100.0):
        shape.start_time = time.perf_counter() - t
        ticks.append(shape.tick())
    out["ticks"] = ticks
print(json.dumps(out))
"""


def locustfile_shapes(repo_root, shape: str | None, **extra_env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    env.update({"QUIVER_SHAPE_USERS": "8", "QUIVER_SHAPE_SPAWN_RATE": "2",
                "QUIVER_SHAPE_DURATION_S": "100", **extra_env})
    if shape is not None:
        env["QUIVER_LOAD_SHAPE"] = shape
    result = subprocess.run([sys.executable, "-c", TICK_SCRIPT.format(root=str(repo_root))],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_locustfile_binds_only_the_shape_the_env_selects(repo_root):
    selected = locustfile_shapes(repo_root, "spike")
    assert selected["shapes"] == ["SpikeShape"]
    assert [tuple(t) if t else None for t in selected["ticks"]] == [
        (2, 8.0), (8, 8.0), (2, 8.0), None]
    assert locustfile_shapes(repo_root, None)["shapes"] == []


def test_locustfile_binds_the_open_loop_generator_alone_when_a_rate_is_set(repo_root):
    assert locustfile_shapes(repo_root, None)["users"] == [
        "StreamingChatUser", "ChatUser", "CompletionUser", "CachedPromptUser",
        "ConversationUser"]
    assert locustfile_shapes(repo_root, None, QUIVER_RATE="5")["users"] == ["OpenLoopUser"]
