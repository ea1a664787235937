"""Move a finished staging dir into place in one rename, readable by everyone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish_dir(staging: Path, dest: Path) -> None:
    """Replace `dest` with `staging`: files 0644, dirs 0755 (staging came from mkdtemp, 0700)."""
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
