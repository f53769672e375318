"""The data engine: streaming readers, repaired real-world conversations, worker processes that give the same
store as one process, a cache that is checked before it is trusted, and rows read by index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from alignkit.data import engine, sources
from alignkit.data.cache import load_pair_rows, load_sft_rows
from alignkit.data.formats import to_example
from alignkit.data.mixture import Source, mix
from alignkit.data.sources import Row, read_rows
from alignkit.data.store import StoredRows, concat, lengths, trained_counts
from alignkit.data.tokenize import IGNORE
from alignkit.errors import RunError, UserError
from tests.conftest import CHATML, write_jsonl

SEPARATORS = "\u2028\u2029\u0085\x1c\x1d\x1e\x0b\x0c\r"


def conversation(i: int, text: str = "") -> dict:
    return {"conversations": [{"from": "human", "value": f"Add {i} and 30.{text}"},
                              {"from": "gpt", "value": f"The answer is {i + 30}.{text}"}]}


def stores_in(cache) -> list:
    """Stores and half-built stores in a cache (the build locks beside them are not)."""
    return [p for p in (cache / "tokenized").iterdir() if not p.name.endswith(".lock")]


def as_lists(rows) -> list:
    return [(r.input_ids, r.labels, r.origin) for r in (rows[i] for i in range(len(rows)))]


# ---------------------------------------------------------------- readers

def test_jsonl_is_split_on_newlines_only(tmp_path):
    rows = [conversation(i, SEPARATORS if i % 2 else "") for i in range(4)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + '{"broken": \n',
                    encoding="utf-8")
    assert len(path.read_text(encoding="utf-8").splitlines()) > 5  # what str.splitlines would have made of it
    with pytest.raises(UserError, match=r"rows.jsonl:5: malformed JSON"):
        read_rows([str(path)])
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    read = read_rows([str(path)])
    assert [r.fields for r in read] == rows and [r.origin for r in read] == [f"{path}:{i}" for i in range(1, 5)]


def test_csv_fields_may_hold_line_breaks_and_rows_are_named_by_their_first_line(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes('prompt,completion\n"two\nlines",a\nb,"c\r\nd\u2028e"\nf,g\n'.encode())
    read = read_rows([str(path)])
    assert [r.fields for r in read] == [{"prompt": "two\nlines", "completion": "a"},
                                        {"prompt": "b", "completion": "c\r\nd\u2028e"},
                                        {"prompt": "f", "completion": "g"}]
    assert [r.origin.rsplit(":", 1)[1] for r in read] == ["2", "4", "6"]


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 22])
def test_json_lists_are_decoded_incrementally_and_equal_a_whole_parse(tmp_path, monkeypatch, block):
    monkeypatch.setattr(sources, "JSON_BLOCK", block)
    rows = [{"text": f"ünï {i} 😀" * (i % 3), "n": 10 ** i, "f": i / 7, "b": None} for i in range(12)]
    for name, value in (("list.json", rows), ("wrapped.json", {"train": rows})):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(value, ensure_ascii=False, indent=1).encode())
        assert [r.fields for r in read_rows([str(path)])] == rows
        assert read_rows([str(path)])[3].origin == f"{path}:row 4"
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(rows, indent=1)[:-40])  # a dump cut off mid-row, as ShareGPT's is
    with pytest.raises(UserError, match=r"cut.json:\d+: malformed JSON"):
        read_rows([str(cut)])


def test_rows_are_read_one_at_a_time(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [conversation(i) for i in range(3)])
    with path.open("a") as file:
        file.write("not json\n")
    stream = sources.iter_rows([str(path)])
    assert [next(stream).origin for _ in range(3)] == [f"{path}:{i}" for i in (1, 2, 3)]  # before the bad line
    with pytest.raises(UserError, match="rows.jsonl:4: malformed JSON"):
        next(stream)


# ---------------------------------------------------------------- real-world conversations

def repaired(conversations: list[dict]):
    example = to_example(Row({"conversations": conversations}, "dump.json:row 1"))
    return [(m.role, m.content, m.train) for m in example.messages], example.repairs


def test_sharegpt_dumps_are_repaired_by_the_documented_rules():
    messages, repairs = repaired([{"from": "gpt", "value": "Hi! How can I help?"},
                                  {"from": "human", "value": "Add 2 and 3."},
                                  {"from": "human", "value": "Quickly."},
                                  {"from": "chatgpt", "value": "5"},
                                  {"from": "user", "value": "  "},
                                  {"from": "bard", "value": "Anything else?"}])
    assert messages == [("user", "Add 2 and 3.\n\nQuickly.", False), ("assistant", "5\n\nAnything else?", True)]
    assert repairs == ["left out 1 empty turns", "left out 1 assistant turns before the first user turn",
                       "merged 2 turns into the turn of the same role before them"]
    messages, repairs = repaired([{"from": "system", "value": "Be brief."}, {"from": "bing", "value": "Hello."},
                                  {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi."}])
    assert [m[0] for m in messages] == ["system", "user", "assistant"] and len(repairs) == 1
    assert repaired([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}])[1] == []


@pytest.mark.parametrize(("conversations", "message"), [
    ([{"from": "gpt", "value": "Hello."}], "needs a user turn before its first assistant turn"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}], "no assistant turn to train on"),
    ([{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}], "unknown role 'robot'"),
])
def test_conversations_that_cannot_be_repaired_are_refused(conversations, message):
    with pytest.raises(UserError, match=message):
        repaired(conversations)


def test_repairs_are_counted_and_named(tmp_path, tokenizer):
    rows = [conversation(i) for i in range(6)]
    rows[2]["conversations"].insert(0, {"from": "gpt", "value": "Welcome!"})
    path = write_jsonl(tmp_path / "dump.jsonl", rows)
    _, stats, _ = load_sft_rows([str(path)], "auto", tokenizer, CHATML, 512)
    assert stats.repaired == 1 and stats.repaired_rows == [f"{path}:3: left out 1 assistant turns before the "
                                                           "first user turn"]


# ---------------------------------------------------------------- worker processes

def mixed_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 5 == 0:
            rows.append({"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}]})
        elif i % 7 == 0:
            rows.append({"prompt": "Hello " * (i % 40), "completion": "world " * 30})  # cut by max_length
        else:
            rows.append(conversation(i, "Hello world. " * (i % 11)))
    return rows


def test_workers_give_the_same_store_as_one_process(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ROWS", 7)
    path = write_jsonl(tmp_path / "rows.jsonl", mixed_rows(90))
    results = []
    for num_proc in (1, 2, 3):
        monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / f"cache-{num_proc}"))
        rows, stats, cached = load_sft_rows([str(path)], "auto", tokenizer, CHATML, 48, on_bad_row="skip",
                                            num_proc=num_proc)
        assert not cached and isinstance(rows, StoredRows)
        results.append((as_lists(rows), vars(stats)))
    assert results[0] == results[1] == results[2]
    assert results[0][1]["truncated"] > 0 and len(results[0][0]) == 90 - results[0][1]["dropped"]


def test_under_workers_the_first_bad_row_in_file_order_is_named(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ROWS", 4)
    rows = mixed_rows(40)
    rows[13] = {"prompt": "Hi", "completion": 7}
    rows[29] = {"question": "?"}
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with path.open("a") as file:
        file.write("{broken\n")
    for num_proc in (1, 2):
        with pytest.raises(UserError, match=r"rows.jsonl:14: field 'completion' must be text"):
            load_sft_rows([str(path)], "auto", tokenizer, CHATML, 512, num_proc=num_proc)
    assert not stores_in(tmp_path / "alignkit-cache")  # nothing half-built is left behind


def test_a_worker_that_dies_ends_the_build_in_one_line_instead_of_hanging(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ROWS", 4)
    path = write_jsonl(tmp_path / "rows.jsonl", mixed_rows(40))
    parent, plain = os.getpid(), engine.encode_chunk

    def killed_in_a_worker(job, rows):  # what the kernel's out-of-memory killer does to a worker
        if os.getpid() != parent and int(rows[0].origin.rsplit(":", 1)[1]) > 20:
            os.kill(os.getpid(), signal.SIGKILL)
        return plain(job, rows)

    monkeypatch.setattr(engine, "encode_chunk", killed_in_a_worker)  # the forked workers inherit it
    started = time.time()
    with pytest.raises(RunError, match=r"a tokenising worker process died .* \(--num-proc 1\)"):
        load_sft_rows([str(path)], "auto", tokenizer, CHATML, 512, num_proc=2)
    assert time.time() - started < 60
    assert not stores_in(tmp_path / "alignkit-cache")


def test_a_file_that_breaks_off_stops_after_the_rows_before_it(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ROWS", 3)
    path = write_jsonl(tmp_path / "rows.jsonl", mixed_rows(20))
    with path.open("a") as file:
        file.write("{broken\n")
    for num_proc in (1, 2):
        with pytest.raises(UserError, match=r"rows.jsonl:21: malformed JSON"):
            load_sft_rows([str(path)], "auto", tokenizer, CHATML, 512, on_bad_row="skip", num_proc=num_proc)


def test_pairs_are_stored_and_reloaded(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ROWS", 5)
    rows = [{"prompt": f"Add {i} and 30.", "chosen": f"{i + 30}", "rejected": f"{i + 31}"} for i in range(23)]
    rows[4]["rejected"] = rows[4]["chosen"]  # no preference: dropped and counted
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    first, stats, cached = load_pair_rows([str(path)], tokenizer, CHATML, 512, num_proc=2)
    again, stats_again, cached_again = load_pair_rows([str(path)], tokenizer, CHATML, 512)
    assert (cached, cached_again) == (False, True) and stats.identical == 1 and stats.pairs == 22
    assert vars(stats) == vars(stats_again)
    pairs = [first[i] for i in range(len(first))]
    assert [(p.chosen.input_ids, p.rejected.labels) for p in pairs] == [
        (again[i].chosen.input_ids, again[i].rejected.labels) for i in range(len(again))]
    assert pairs[0].origin == f"{path}:1" and pairs[4].origin == f"{path}:6"
    assert lengths(first).shape == (22, 2) and (trained_counts(first) > 0).all()


# ---------------------------------------------------------------- the cache

def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "rows.jsonl", mixed_rows(30))
    rows, _, _ = load_sft_rows([str(path)], "auto", tokenizer, CHATML, 512)
    expected = as_lists(rows)
    folder = rows.stores[0].folder
    damages = {
        "flipped": lambda: _flip(folder / "ids.bin"),
        "truncated": lambda: _truncate(folder / "trained.bin"),
        "meta": lambda: (folder / "meta.json").write_text((folder / "meta.json").read_text().replace('"rows": 30',
                                                                                                    '"rows": 31')),
        "missing": lambda: (folder / "counts.bin").unlink(),
    }
    for name, damage in damages.items():
        damage()
        capsys.readouterr()
        rebuilt, _, cached = load_sft_rows([str(path)], "auto", tokenizer, CHATML, 512)
        assert not cached and as_lists(rebuilt) == expected, name
        assert "tokenised-data cache has" in capsys.readouterr().err, name
        assert load_sft_rows([str(path)], "auto", tokenizer, CHATML, 512)[2] is True


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def test_a_store_left_half_built_is_never_used(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "rows.jsonl", mixed_rows(12))
    calls = {"n": 0}
    real = engine.encode_chunk

    def dies_on_second_chunk(job, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(job, rows)

    monkeypatch.setattr(engine, "CHUNK_ROWS", 5)
    monkeypatch.setattr(engine, "encode_chunk", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        load_sft_rows([str(path)], "auto", tokenizer, CHATML, 512)
    assert not stores_in(tmp_path / "alignkit-cache")
    monkeypatch.setattr(engine, "encode_chunk", real)
    assert load_sft_rows([str(path)], "auto", tokenizer, CHATML, 512)[2] is False


def test_ctrl_c_stops_every_worker_and_leaves_no_store(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", mixed_rows(400))
    script = textwrap.dedent(f"""
        import time
        from alignkit.data import engine
        from alignkit.data.cache import load_sft_rows
        from tests.conftest import CHATML, build_tokenizer

        real = engine.encode_chunk
        def slow(job, rows):
            time.sleep(0.5)
            return real(job, rows)
        engine.encode_chunk = slow
        engine.CHUNK_ROWS = 4
        print("started", flush=True)
        load_sft_rows([{str(path)!r}], "auto", build_tokenizer(), CHATML, 512, num_proc=2)
    """)
    env = {**os.environ, "ALIGNKIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout.readline().strip() == "started"
    time.sleep(3)
    children = _children(process.pid)
    assert len(children) >= 2  # the workers are running
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    process.wait(timeout=30)
    assert process.returncode != 0 and "KeyboardInterrupt" in process.stderr.read()
    time.sleep(0.5)
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    assert not stores_in(tmp_path / "cache")


def _children(pid: int) -> list[int]:
    found = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


# ---------------------------------------------------------------- rows read by index

def test_stored_rows_behave_like_the_list_of_rows(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", mixed_rows(17))
    b = write_jsonl(tmp_path / "b.jsonl", mixed_rows(9))
    stored = [load_sft_rows([str(p)], "auto", tokenizer, CHATML, 64)[0] for p in (a, b)]
    listed = [load_sft_rows([str(p)], "auto", tokenizer, CHATML, 64, use_cache=False)[0] for p in (a, b)]
    assert [as_lists(s) for s in stored] == [as_lists(rows) for rows in listed]
    sources_ = [Source(str(a), count=30, replace=True), Source(str(b), fraction=0.5)]
    mixed_stored, _ = mix(stored, sources_, 0, seed=5)
    mixed_listed, _ = mix(listed, sources_, 0, seed=5)
    assert isinstance(mixed_stored, StoredRows) and as_lists(mixed_stored) == as_lists(mixed_listed)
    assert as_lists(mixed_stored[3:20:4]) == as_lists(mixed_listed[3:20:4])
    assert (lengths(mixed_stored) == lengths(mixed_listed)).all()
    assert (trained_counts(mixed_stored) == trained_counts(mixed_listed)).all()
    both = concat([stored[1], stored[0], stored[1]])
    assert as_lists(both) == as_lists(listed[1] + listed[0] + listed[1])
    assert all(label in (IGNORE, token) for r in as_lists(both) for token, label in zip(r[0], r[1], strict=True))
    assert np.array_equal(both.take([]).lengths(), np.zeros((0, 1)))


# ---------------------------------------------------------------- the inspector

def test_data_inspect_marks_the_trained_text_and_counts_what_training_would_do(tmp_path, tiny_model_dir, capsys):
    from alignkit.cli import main

    rows = [{"prompt": "Hello", "completion": "The answer is 42."},
            {"conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "Add 12 and 30."},
                               {"from": "gpt", "value": "42"}]},
            {"prompt": "Hi", "completion": 3},
            {"prompt": "Hello " * 80, "completion": "world"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    plot = tmp_path / "lengths.png"
    assert main(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--rows", "2", "--color", "never",
                 "--max-length", "64", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant\n[[The answer is 42.<|im_end|>]]" in out
    assert "Add 12 and 30.<|im_end|>\n<|im_start|>assistant\n[[42<|im_end|>]]" in out and "Hi!" not in out
    assert "2 rows, " in out and "1 dropped: the prompt alone fills max_length" in out
    assert f"1 repaired: changed by the repair rules (e.g. {data}:2: left out 1 assistant turns" in out
    assert f"1 skipped: bad rows left out (e.g. {data}:3: field 'completion'" in out
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert main(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--rows", "1", "--color", "always",
                 "--plot", str(plot)]) == 0
    assert "\x1b[42;30mThe answer is 42.<|im_end|>\x1b[0m" in capsys.readouterr().out


def test_a_run_writes_the_inspectors_view_of_its_training_rows(tmp_path, tiny_model_dir):
    from alignkit.api import make_dpo_config, make_sft_config
    from alignkit.recipes import dpo, sft

    rows = [{"prompt": "Hello", "completion": "The answer is 42."}, {"prompt": "Hi", "completion": 3},
            {"prompt": "Add 12 and 30.", "completion": "42"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = {"model": str(tiny_model_dir), "dtype": "fp32", "max_steps": 1, "batch_size": 2, "save_steps": 0,
              "on_bad_row": "skip"}
    summary = sft.run(make_sft_config(common, data=[str(data)], output_dir=str(tmp_path / "sft")))
    view = json.loads((tmp_path / "sft" / "data.json").read_text())
    assert view["rows"] == summary["rows"]["used"] == 2 and view["statistics"]["skipped"] == 1
    assert view["trained_tokens"] == summary["trained_tokens"] and 0 < view["trained_fraction"] < 1  # 1 step: all
    first = view["shown"][0]["sides"][0]
    assert "".join(text for text, trained in first["segments"] if trained) == "The answer is 42.<|im_end|>"
    assert "".join(text for text, _ in first["segments"]).startswith("<|im_start|>user\nHello<|im_end|>")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "yes", "rejected": "no"}])
    dpo.run(make_dpo_config(common, data=[str(pairs)], output_dir=str(tmp_path / "dpo"), batch_size=1))
    sides = json.loads((tmp_path / "dpo" / "data.json").read_text())["shown"][0]["sides"]
    assert [(s["name"], "".join(t for t, trained in s["segments"] if trained)) for s in sides] == [
        ("chosen", "yes<|im_end|>"), ("rejected", "no<|im_end|>")]


def test_data_inspect_shows_both_sides_of_a_pair_and_refuses_bad_usage(tmp_path, tiny_model_dir, capsys):
    from alignkit.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Add 12 and 30.", "chosen": "42", "rejected": "43"}])
    assert main(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--color", "never",
                 "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "[[42<|im_end|>]]" in out and "[[43<|im_end|>]]" in out and " chosen: " in out and " rejected: " in out
    assert main(["data", "look", str(data)]) == 2
    assert main(["data", "inspect", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "usage: alignkit data inspect FILE" in err and "nope.jsonl: data file not found" in err


# ---------------------------------------------------------------- encoding only what max_length keeps

def test_encoding_a_cut_text_gives_exactly_the_tokens_of_the_whole_text(tokenizer, monkeypatch):
    import random

    from alignkit.data import tokenize

    rng = random.Random(0)
    pieces = ["Hello", " world", "  ", "\n", "\n\n", "   \n ", "café", "你好", "42", "<|im_end|>", "<|im_start|>",
              "user", ".", "!!", "x" * 50, " " * 30, "\t", "😀", "ab" * 20]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 120))) for _ in range(300)]
    backend = tokenizer.backend_tokenizer
    settled = []
    real = tokenize._settled
    monkeypatch.setattr(tokenize, "_settled", lambda *a: settled.append(real(*a)) or settled[-1])
    for first_cut in (1, 2, 8):
        monkeypatch.setattr(tokenize, "FIRST_CUT", first_cut)
        for max_length in (1, 3, 17, 64):
            got = tokenize.encode_cut(tokenizer, texts, max_length)
            for text, (encoding, truncated) in zip(texts, got, strict=True):
                whole = backend.encode(text, add_special_tokens=False)
                assert truncated == (len(whole) > max_length)
                assert encoding.ids == whole.ids[:max_length], (text, max_length, first_cut)
                assert encoding.offsets == whole.offsets[:max_length]
    assert sum(settled) > 500  # most long texts were taken from a prefix, not encoded whole


def test_padding_left_on_the_tokenizer_by_an_earlier_call_never_reaches_the_rows(tmp_path):
    """transformers leaves a padded call's padding set on the Rust backend (generation pads on the left)."""
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    path = write_jsonl(tmp_path / "rows.jsonl", mixed_rows(12))
    before = as_lists(load_sft_rows([str(path)], "auto", tokenizer, CHATML, 64, use_cache=False)[0])
    tokenizer.padding_side = "left"
    tokenizer(["Hello", "Hello world, a longer text"], padding=True)
    assert tokenizer.backend_tokenizer.padding is not None  # what generation leaves behind
    assert as_lists(load_sft_rows([str(path)], "auto", tokenizer, CHATML, 64, use_cache=False)[0]) == before
    stored = load_sft_rows([str(path)], "auto", tokenizer, CHATML, 64)[0]
    assert as_lists(stored) == before
