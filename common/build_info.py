"""What a process is, as metrics: `quiver_build_info` and process resources.

`quiver_build_info` is a gauge fixed at 1 whose labels say the version, the component
(`server` | `gateway`) and, for a model server, the engine and the served model; dashboards
join on it (`* on(instance) group_left(engine) quiver_build_info`) and it tells an operator
which release a pod runs. Process CPU, memory and file descriptors come from
prometheus_client's process collector, on the caller's registry.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

from common import __version__


def register_build_info(registry: CollectorRegistry, *, component: str, engine: str = "",
                        model: str = "") -> None:
    info = Gauge("quiver_build_info", "Quiver build and role of this process (always 1)",
                 ["version", "python_version", "component", "engine", "model"],
                 registry=registry)
    info.labels(__version__, platform.python_version(), component, engine, model).set(1)
    ProcessCollector(registry=registry)
