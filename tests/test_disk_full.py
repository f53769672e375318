"""A disk that fills up during a save, on a real (tmpfs) file system: the previous state stays usable.

Needs root to mount a tmpfs; skipped, with the reason printed, elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.training.checkpoint import latest_checkpoint, write_failure
from tests.test_reliability import sft_args, write_jsonl


@pytest.fixture
def small_disk(tmp_path):
    """mount(size): a tmpfs of `size` bytes at tmp_path/disk; remount(size) resizes it; unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: int, remount: bool = False) -> Path:
        options = f"{'remount,' if remount else ''}size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}; needs root)")
        mounted.append(disk)
        return disk

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def folders(parent: Path) -> list[Path]:
    """Every folder in `parent`, hidden ones (a build's staging folder) included; lock files are not folders."""
    return sorted(p for p in parent.iterdir() if p.is_dir())


def model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir())


def error_line(err: str) -> str:
    """The error, one line, whatever tqdm's bar left before it."""
    assert "Traceback" not in err and err.count("alignkit: error:") == 1, err
    return err.split("alignkit: error:")[1].splitlines()[0]


# A checkpoint is about three model folders: the weights and AdamW's two moments, plus a few small files.

def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_for_resume(tmp_path, tiny_model_dir, small_disk,
                                                                           capsys):
    disk = small_disk(int(4.4 * model_bytes(tiny_model_dir)))  # step-2 fits, step-4 beside it does not
    args = sft_args(tmp_path, tiny_model_dir, "--output-dir", str(disk / "o"), "--max-steps", "4", "--save-steps", "2")
    assert main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert "could not save checkpoint" in line and "step-4 (No space left on device)" in line, line
    assert "step-2 is intact" in line and "--resume" in line
    checkpoints = disk / "o" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]  # no half-written step-4 left
    assert latest_checkpoint(checkpoints) == checkpoints / "step-2" and not (disk / "o" / "final").exists()
    small_disk(16 << 20, remount=True)
    assert main([*args, "--resume"]) == 0
    assert json.loads((disk / "o" / "summary.json").read_text())["steps"] == 4
    assert "resuming from" in capsys.readouterr().err


def test_a_full_disk_while_writing_final_keeps_the_checkpoint_and_leaves_no_half_model(tmp_path, tiny_model_dir,
                                                                                       small_disk, capsys):
    disk = small_disk(int(3.6 * model_bytes(tiny_model_dir)))  # the step-2 checkpoint fits, final/ then does not
    args = sft_args(tmp_path, tiny_model_dir, "--output-dir", str(disk / "o"), "--max-steps", "2", "--save-steps", "2")
    assert main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert f"could not save {disk / 'o' / 'final'} (No space left on device)" in line, line
    assert "step-2 is intact" in line
    assert not (disk / "o" / "final").exists() and not (disk / "o" / ".final.tmp").exists()
    small_disk(16 << 20, remount=True)
    assert main([*args, "--resume"]) == 0
    assert (disk / "o" / "final" / "model.safetensors").is_file()


def test_what_a_full_disk_looks_like_from_each_writer(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    assert write_failure(OSError(28, "No space left on device"), tmp_path) == "No space left on device"
    safetensors_error = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_failure(safetensors_error, tmp_path) == os.strerror(28)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5312 vs 5204")
    assert write_failure(torch_error, tmp_path) is None  # plenty of room here: not the disk, so shown as it is
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 4096))
    assert write_failure(torch_error, tmp_path) == os.strerror(28)


def test_a_full_disk_while_tokenising_leaves_no_half_store_and_earlier_stores_usable(tmp_path, tiny_model_dir,
                                                                                      small_disk, monkeypatch, capsys):
    from alignkit.data.store import TokenStore

    disk = small_disk(64 << 10)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(disk))
    args = sft_args(tmp_path, tiny_model_dir, "--output-dir", str(tmp_path / "o"), "--max-steps", "1",
                    "--save-steps", "0")
    assert main(args) == 0  # a few rows: their store fits
    stores = folders(disk / "tokenized")
    assert len(stores) == 1 and TokenStore.open(stores[0]) is not None
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": f"Question {i}? " * 20, "completion": "Answer " * 40}
                                               for i in range(400)])
    big_args = [*args[:args.index("--data")], "--data", str(big), *args[args.index("--data") + 2:], "--overwrite"]
    assert main(big_args) in (1, 2)
    line = error_line(capsys.readouterr().err)
    assert "could not write the tokenised-data cache" in line and "(No space left on device)" in line, line
    assert folders(disk / "tokenized") == stores  # no half store, no staging folder
    assert TokenStore.open(stores[0]) is not None
    built = (stores[0] / "meta.json").stat().st_mtime_ns
    assert main([*args, "--overwrite"]) == 0  # and trains on the earlier store, not a new one
    assert folders(disk / "tokenized") == stores and (stores[0] / "meta.json").stat().st_mtime_ns == built
