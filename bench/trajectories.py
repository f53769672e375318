"""Record the training trajectories of SFT and DPO on a tiny random model, to check a refactor changes nothing.

    python bench/trajectories.py --out before.json            # on the old code
    python bench/trajectories.py --out after.json --compare before.json

Each case runs the CLI (one process, or two under torchrun / DDP / FSDP / DeepSpeed ZeRO) in fp32 on CPU and
keeps every metrics.jsonl and summary.json value that is not a time, a rate or a path; `--compare` lists each
case and metric that is not bit-for-bit equal. `--keep DIR` leaves the run folders (with their checkpoints of
steps 2 and 4) in DIR; `--resume-from DIR` copies each run folder from there, keeps its step-2 checkpoint only
and resumes it to step 5, so that a checkpoint written by the old code is resumed by the new one:

    python bench/trajectories.py --out before.json --keep old/          # on the old code
    python bench/trajectories.py --out resumed.json --resume-from old/ --compare before.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import build_model, build_tokenizer  # noqa: E402

TIMING = ("elapsed_s", "tokens_per_s", "pairs_per_s", "steps_per_s", "step_s", "peak_memory_mib")
PAIRS = [(a, b) for a in range(10, 18) for b in range(20, 22)] + [(30, 40)]
SFT_ROWS = [{"prompt": f"Add {a} and {b}.", "completion": f"The answer is {a + b}."} for a, b in PAIRS]
DPO_ROWS = [{"prompt": f"Add {a} and {b}.", "chosen": f"The answer is {a + b}.", "rejected": f"It is {a + b + 1}."}
            for a, b in PAIRS]
LORA = ["--lora", "--lora-dropout", "0"]

# name: (command, processes, launch, flags); launch is "" (one process), "torchrun" or a ZeRO stage
CASES = {
    "sft-full": ("sft", 1, "", ["--lr", "1e-3"]),
    "sft-lora": ("sft", 1, "", ["--lr", "1e-2", *LORA]),
    "sft-packed": ("sft", 1, "", ["--lr", "1e-3", "--layout", "packed"]),
    "sft-padded": ("sft", 1, "", ["--lr", "1e-3", "--layout", "padded"]),
    "dpo-copy": ("dpo", 1, "", ["--lr", "1e-3"]),
    "dpo-adapter": ("dpo", 1, "", ["--lr", "1e-2", *LORA]),
    "dpo-precomputed": ("dpo", 1, "", ["--lr", "1e-3", "--reference", "precomputed"]),
    "dpo-precomputed-lora": ("dpo", 1, "", ["--lr", "1e-2", "--reference", "precomputed", *LORA]),
    "dpo-none-simpo": ("dpo", 1, "", ["--lr", "1e-3", "--loss-type", "simpo"]),
    "dpo-mixed-padded": ("dpo", 1, "", ["--lr", "1e-3", "--loss-type", "sigmoid", "sft", "--loss-weights", "1",
                                        "0.5", "--layout", "padded"]),
    "dpo-per-sequence": ("dpo", 1, "", ["--lr", "1e-3", "--layout", "per_sequence"]),
    "sft-ddp": ("sft", 2, "torchrun", ["--lr", "1e-3", "--strategy", "ddp"]),
    "sft-fsdp": ("sft", 2, "torchrun", ["--lr", "1e-3", "--strategy", "fsdp"]),
    "dpo-lora-ddp": ("dpo", 2, "torchrun", ["--lr", "1e-2", *LORA, "--strategy", "ddp"]),
    "dpo-full-fsdp": ("dpo", 2, "torchrun", ["--lr", "1e-3", "--strategy", "fsdp"]),
    "sft-zero2": ("sft", 2, "2", ["--lr", "1e-3"]),
    "dpo-zero3": ("dpo", 2, "3", ["--lr", "1e-3"]),
}


def launcher(processes: int, launch: str) -> list[str]:
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def zero_env(stage: str) -> dict:
    """What a ZeRO launch sets, as tests/test_deepspeed.py sets it for torchrun."""
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": stage, "DS_ACCELERATOR": "cpu"}


def from_step_2(old: Path, out: Path) -> None:
    """The old run folder as it was after step 2: later checkpoints removed, so --resume continues from there."""
    shutil.copytree(old, out)
    for checkpoint in (out / "checkpoints").glob("step-*"):
        if checkpoint.name != "step-2":
            shutil.rmtree(checkpoint)
    (out / "checkpoints" / "latest").write_text("step-2")


def run_case(name: str, work: Path, model: Path, resume_from: Path | None = None) -> list[dict]:
    command, processes, launch, flags = CASES[name]
    rows = SFT_ROWS if command == "sft" else DPO_ROWS
    data, held = work / f"{command}.jsonl", work / f"{command}-eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text(json.dumps(rows[0]) + "\n")
    out = work / name
    batch = "4" if processes == 1 else "2"
    args = [command, "--model", str(model), "--data", str(data), "--eval-data", str(held), "--eval-steps", "2",
            "--max-steps", "5", "--grad-accum", "2", "--batch-size", batch, "--dtype", "fp32", "--save-steps", "2",
            "--output-dir", str(out), *flags]
    if resume_from is not None:
        from_step_2(resume_from / name, out)
        args.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNKIT_CACHE": str(work / "cache")}
    if launch not in ("", "torchrun"):
        env.update(zero_env(launch))
    done = subprocess.run([*launcher(processes, launch), "-m", "alignkit", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    summary = {k: v for k, v in summary.items() if k not in ("output_dir", "final") and not k.endswith("seconds")}
    for source in summary.get("sources", []):
        source["path"] = Path(source["path"]).name
    return [{k: v for k, v in row.items() if k not in TIMING} for row in [*rows, summary]]


def compare(now: dict, before: dict) -> int:
    differing = 0
    for name, rows in before.items():
        if name not in now:
            continue
        for step, (old, new) in enumerate(zip(rows, now[name], strict=False)):
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    differing += 1
                    print(f"{name} row {step} {key}: {old.get(key)!r} -> {new.get(key)!r}")
        if len(rows) != len(now[name]):
            differing += 1
            print(f"{name}: {len(rows)} rows -> {len(now[name])}")
    print(f"{differing} differing values over {len(set(now) & set(before))} cases")
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--keep", help="leave the run folders here")
    parser.add_argument("--resume-from", type=Path, help="resume the step-2 checkpoints of the runs kept here")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="trajectories-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny-model"
    if not model.exists():
        tokenizer = build_tokenizer()
        build_model(tokenizer).save_pretrained(model)
        tokenizer.save_pretrained(model)
    results = {}
    for name in args.cases:
        results[name] = run_case(name, work, model, args.resume_from)
        print(f"{name}: {len(results[name])} rows, last {results[name][-1]}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    if args.compare:
        sys.exit(1 if compare(results, json.loads(Path(args.compare).read_text())) else 0)


if __name__ == "__main__":
    main()
