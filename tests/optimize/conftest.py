"""Fixtures for the optimize tests: CLI-parsed options and a direct `Method.build()`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def optimize_args() -> Callable[..., argparse.Namespace]:
    """`optimize_args("int8", "--model", m, ...)`: the Namespace `quiver optimize` builds."""
    from quiver.cli import build_parser

    def parse(*argv: str | Path) -> argparse.Namespace:
        return build_parser().parse_args(["optimize", *map(str, argv)])

    return parse


@pytest.fixture
def build_method(optimize_args, tmp_path: Path):
    """Run one method's `build()` on `model` into `out` (no evaluation, no manifest)."""
    import importlib

    from optimize.data import load_texts
    from optimize.methods import METHODS
    from optimize.methods.base import BuildContext

    def build(name: str, model: Path, out: Path, *extra: str):
        args = optimize_args(name, "--model", model, "--out", out, *extra)
        out.mkdir(parents=True)
        work = tmp_path / f"work-{name}"
        work.mkdir(exist_ok=True)
        calibration = load_texts(args.calib_data, "calibration", limit=args.calib_samples)
        method = importlib.import_module(METHODS[name]).METHOD
        return method.build(BuildContext(source=Path(model), out=out,
                                         calibration=calibration, args=args, work_dir=work))

    return build
