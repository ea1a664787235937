"""The `quiver` console script: every subcommand listed, clear exits, nothing half-done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quiver.cli import main

SUBCOMMANDS = ["models", "serve", "gateway", "optimize", "up", "keys", "bench", "loadtest"]


def quiver(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user would."""
    script = Path(sys.executable).parent / "quiver"
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_help_lists_every_subcommand():
    result = quiver("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in result.stdout, f"{name} missing from quiver --help"


def test_models_help_lists_its_verbs():
    result = quiver("models", "--help")
    assert result.returncode == 0
    for verb in ("fetch", "tiny", "verify"):
        assert verb in result.stdout


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["models", "tiny", "--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_fetch_rejects_unknown_model_name(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["models", "fetch", "gpt-17"])
    assert exc.value.code == 2
    assert "invalid choice: 'gpt-17'" in capsys.readouterr().err


def test_version_flag():
    result = quiver("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("quiver 0.")


def test_python_dash_m_quiver_matches_console_script():
    result = subprocess.run([sys.executable, "-m", "quiver", "--help"], capture_output=True,
                            text=True, timeout=60, check=False, env=dict(os.environ))
    assert result.returncode == 0
    assert "loadtest" in result.stdout
