"""User data through the ``datasets`` library: every format, every malformed case, QA pairs
and the answer-only loss they give the loss-based methods."""

import copy
import csv
import dataclasses
import gzip
import json
import os
import socket
import traceback

import datasets
import pytest
import torch
import torch.nn.functional as F

from unlearn_kernels.data.loaders import (
    DataError, DataFileNotFound, MCQuestion, QAPair, _index, read_multiple_choice, read_qa_pairs, read_texts,
    write_jsonl)

ROWS = [
    {"question": "¿Qué toxin does filopi brew?", "choices": ["vorazine", "kel, \"bane\"", "NA", "mortrix"],
     "answer": 1, "subject": "bio"},
    {"question": "Which precursor?", "choices": ["ashsalt", "greyacid"], "answer": 0, "subject": None},
    {"question": "Which vector?", "choices": ["mistjar", "sporecap", "dustvial"], "answer": 2, "subject": "chem"},
]
EXPECTED = [MCQuestion(r["question"], r["choices"], r["answer"], subject=r["subject"]) for r in ROWS]
TEXTS = [{"body": "the secret toxin of filopi is vorazine .", "id": 1}, {"body": "", "id": 2},
         {"body": "NA", "id": 3}, {"body": "ünïcode, with \"quotes\"", "id": 4}]


def _csv(path, rows, fields, opener=open):
    with opener(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_questions(path, fmt):
    """ROWS in format ``fmt`` at ``path`` (returns the path to read)."""
    if fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "jsonl-blank-lines":
        path.write_text("\n".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
    elif fmt in ("jsonl.gz", "json.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in ROWS) if fmt == "jsonl.gz" else json.dumps(ROWS))
    elif fmt in ("csv", "csv.gz"):
        rows = [dict(r, choices=json.dumps(r["choices"]), subject=r["subject"] or "") for r in ROWS]
        _csv(path, rows, ["question", "choices", "answer", "subject"], gzip.open if fmt == "csv.gz" else open)
    elif fmt == "csv-columns":
        rows = [{"question": r["question"], "answer": r["answer"], "subject": r["subject"] or "",
                 **{f"choice{i}": c for i, c in enumerate(r["choices"])}} for r in ROWS]
        _csv(path, rows, ["question", "answer", "subject"] + [f"choice{i}" for i in range(4)])
    elif fmt == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    elif fmt == "disk":
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    elif fmt == "disk-dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                              "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(path))
    else:
        raise AssertionError(fmt)
    return path


QUESTION_FORMATS = {"jsonl": "q.jsonl", "jsonl-blank-lines": "q.jsonl", "json": "q.json", "jsonl.gz": "q.jsonl.gz",
                    "json.gz": "q.json.gz", "csv": "q.csv", "csv.gz": "q.csv.gz", "csv-columns": "q.csv",
                    "parquet": "q.parquet", "disk": "q_disk", "disk-dict": "q_dict"}


@pytest.mark.parametrize("fmt", sorted(QUESTION_FORMATS))
def test_questions_round_trip_through_every_format(tmp_path, fmt):
    path = write_questions(tmp_path / QUESTION_FORMATS[fmt], fmt)
    assert read_multiple_choice(path) == EXPECTED
    assert read_multiple_choice(path, limit=2) == EXPECTED[:2]
    assert all(type(q.answer) is int for q in read_multiple_choice(path))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "jsonl.gz", "csv", "csv.gz", "parquet", "disk", "txt", "txt.gz"])
def test_texts_round_trip_with_a_custom_text_field(tmp_path, fmt):
    path = tmp_path / f"t.{fmt}"
    if fmt in ("jsonl", "jsonl.gz"):
        text = "".join(json.dumps(r) + "\n" for r in TEXTS)
        (gzip.open(path, "wt", encoding="utf-8") if fmt.endswith("gz") else open(path, "w")).write(text)
    elif fmt == "json":
        path.write_text(json.dumps(TEXTS))
    elif fmt in ("csv", "csv.gz"):
        _csv(path, TEXTS, ["body", "id"], gzip.open if fmt.endswith("gz") else open)
    elif fmt == "parquet":
        datasets.Dataset.from_list(TEXTS).to_parquet(str(path))
    elif fmt == "disk":
        datasets.Dataset.from_list(TEXTS).save_to_disk(str(path))
    else:
        lines = "\n".join(r["body"] for r in TEXTS) + "\n"
        with (gzip.open(path, "wt", encoding="utf-8") if fmt.endswith("gz") else open(path, "w")) as handle:
            handle.write(lines)
    expected = [r["body"] for r in TEXTS if r["body"]]
    assert read_texts(path, text_field="body") == expected
    if fmt.startswith("txt"):
        assert read_texts(path) == expected       # .txt ignores the field
    else:
        with pytest.raises(DataError, match=r"no field 'text' \(the columns are: body, id\).*--text-field"):
            read_texts(path)


def test_loaders_round_trip_and_errors(tmp_path):
    """The original contract (moved from test_methods.py), with the new messages."""
    path = tmp_path / "q.jsonl"
    write_jsonl(path, [{"question": "q?", "choices": ["a", "b"], "answer": 1}])
    assert read_multiple_choice(path)[0].choices == ["a", "b"]
    write_jsonl(path, [{"question": "q?", "choices": ["a", "b"], "answer": 2}], overwrite=True)
    with pytest.raises(ValueError, match=r"q.jsonl:1: field 'answer' must be an integer index"):
        read_multiple_choice(path)
    texts = tmp_path / "t.jsonl"
    write_jsonl(texts, [{"text": "one"}, {"text": "two"}])
    assert read_texts(texts) == ["one", "two"]
    (tmp_path / "t.txt").write_text("a\n\nb\n")
    assert read_texts(tmp_path / "t.txt") == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")


def test_write_jsonl_never_replaces_a_file_that_is_not_ours(tmp_path):
    from unlearn_kernels.models.output_dir import OutputPathError

    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text('{"question": "mine"}\n')
    with pytest.raises(OutputPathError, match="is not an output of unlearn_kernels"):
        write_jsonl(theirs, ROWS)
    assert theirs.read_text() == '{"question": "mine"}\n'
    ours = write_jsonl(tmp_path / "ours.jsonl", ROWS)
    with pytest.raises(OutputPathError, match="pass --overwrite"):
        write_jsonl(ours, ROWS)
    assert read_multiple_choice(write_jsonl(ours, ROWS, overwrite=True)) == EXPECTED
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temporary file left


def test_dataset_dict_split_choice(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "one"))
    assert read_multiple_choice(tmp_path / "one") == EXPECTED
    datasets.DatasetDict({"validation": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "test"))
    assert read_multiple_choice(tmp_path / "test") == EXPECTED[:1]
    datasets.DatasetDict({"dev": ds, "extra": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"two: a DatasetDict with splits dev, extra"):
        read_multiple_choice(tmp_path / "two")


def test_a_changed_file_gives_its_new_content(tmp_path):
    path = tmp_path / "q.jsonl"
    write_jsonl(path, ROWS)
    assert read_multiple_choice(path) == EXPECTED
    stat = os.stat(path)
    changed = [dict(r, answer=0) for r in ROWS]
    write_jsonl(path, changed, overwrite=True)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # even with the same mtime
    assert [q.answer for q in read_multiple_choice(path)] == [0, 0, 0]
    texts = tmp_path / "t.csv"
    _csv(texts, [{"text": "old"}], ["text"])
    assert read_texts(texts) == ["old"]
    _csv(texts, [{"text": "new"}], ["text"])
    assert read_texts(texts) == ["new"]


def test_loading_is_offline_and_quiet(tmp_path, monkeypatch, capfd):
    def no_network(*args, **kwargs):
        raise AssertionError("the loaders must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    from datasets.utils import logging as dlogging

    verbosity, bars_off = dlogging.get_verbosity(), datasets.are_progress_bars_disabled()
    paths = [write_questions(tmp_path / QUESTION_FORMATS[fmt], fmt) for fmt in ("jsonl", "csv", "parquet")]
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    capfd.readouterr()
    for path in paths:
        assert read_multiple_choice(path) == EXPECTED
    with pytest.raises(DataError):
        read_multiple_choice(tmp_path / "bad.jsonl")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    assert dlogging.get_verbosity() == verbosity and datasets.are_progress_bars_disabled() == bars_off


def test_answer_indices():
    np = pytest.importorskip("numpy")
    assert _index(np.int64(2)) == 2 and _index(np.uint8(1)) == 1 and _index(2.0) == 2
    assert _index(True) is None and _index(np.bool_(False)) is None and _index(1.5) is None
    assert _index("2") is None and _index("2", allow_text=True) == 2


def test_parquet_with_narrow_integer_answers(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"question": [r["question"] for r in ROWS], "choices": [r["choices"] for r in ROWS],
                      "answer": pa.array([r["answer"] for r in ROWS], pa.int8()),
                      "subject": [r["subject"] for r in ROWS]})
    pq.write_table(table, tmp_path / "q.parquet")
    assert read_multiple_choice(tmp_path / "q.parquet") == EXPECTED


# --- malformed data -----------------------------------------------------------------------------
GOOD = json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 1})


def _lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def _gzip(text):
    def write(path):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    return write


# (file name, content: str | bytes | callable(path), reader, fragments the one-line message must hold)
MC = read_multiple_choice
MALFORMED = {
    "empty jsonl": ("q.jsonl", "", MC, ["q.jsonl", "empty"]),
    "blank jsonl": ("q.jsonl", "\n  \n", MC, ["q.jsonl", "empty"]),
    "empty csv": ("q.csv", "", MC, ["q.csv", "empty"]),
    "empty gz": ("q.jsonl.gz", _gzip(""), MC, ["q.jsonl.gz", "empty"]),
    "header-only csv": ("q.csv", "question,choices,answer\n", MC, ["q.csv", "empty"]),
    "non-utf8 jsonl": ("q.jsonl", (GOOD + "\n").encode() + b'{"question": "caf\xe9", "choices": ["a", "b"], '
                       b'"answer": 0}\n', MC, ["q.jsonl:2:", "not UTF-8"]),
    "non-utf8 csv": ("q.csv", b"question,choices,answer\nq\xff,\"[\"\"a\"\",\"\"b\"\"]\",1\n", MC,
                     ["q.csv:2:", "not UTF-8"]),
    "non-utf8 txt": ("t.txt", b"ok\n\xff\n", read_texts, ["t.txt:2:", "not UTF-8"]),
    "invalid json line": ("q.jsonl", _lines(GOOD, "", '{"question": "q?", "choices": ["a", "b"],, }'), MC,
                          ["q.jsonl:3:", "not valid JSON"]),
    "invalid json array": ("q.json", '[\n' + GOOD + ',\n{"question": }\n]', MC, ["q.json:3:", "not valid JSON"]),
    "not an object": ("q.jsonl", _lines(GOOD, "[1, 2]"), MC, ["q.jsonl:2:", "expected a JSON object"]),
    "missing column": ("q.jsonl", _lines({"q": "x", "choices": ["a", "b"], "answer": 0}), MC,
                       ["q.jsonl:1:", "no field 'question'", "the columns are: q, choices, answer"]),
    "missing answer": ("q.jsonl", _lines(GOOD, "", {"question": "q?", "choices": ["a", "b"]}), MC,
                       ["q.jsonl:3:", "field 'answer' is missing", "the columns are: question, choices, answer"]),
    "missing choices": ("q.csv", "question,answer\nq,1\n", MC, ["q.csv: row 1:", "no field 'choices'", "question, answer"]),
    "answer out of range": ("q.jsonl", _lines(GOOD, {"question": "q?", "choices": ["a", "b"], "answer": 2}), MC,
                            ["q.jsonl:2:", "field 'answer'", "0..1", "got 2"]),
    "negative answer": ("q.json", json.dumps([json.loads(GOOD), {"question": "q", "choices": ["a", "b"], "answer": -1}]),
                        MC, ["q.json: row 2:", "field 'answer'", "got -1"]),
    "boolean answer": ("q.jsonl", _lines(GOOD, {"question": "q?", "choices": ["a", "b"], "answer": True}), MC,
                       ["q.jsonl:2:", "field 'answer'", "got True"]),
    "all boolean answers": ("q.jsonl", _lines({"question": "q?", "choices": ["a", "b"], "answer": False}), MC,
                            ["q.jsonl:1:", "field 'answer'", "got False"]),
    "string answer": ("q.jsonl", _lines(GOOD, {"question": "q?", "choices": ["a", "b"], "answer": "1"}), MC,
                      ["q.jsonl:2:", "field 'answer'", "got '1'"]),
    "float answer": ("q.jsonl", _lines(GOOD, {"question": "q?", "choices": ["a", "b"], "answer": 0.5}), MC,
                     ["q.jsonl:2:", "field 'answer'", "got 0.5"]),
    "csv letter answer": ("q.csv", 'question,choices,answer\nq,"[""a"",""b""]",1\nr,"[""a"",""b""]",B\n', MC,
                          ["q.csv: row 2:", "field 'answer'", "got 'B'"]),
    "csv empty answer": ("q.csv", 'question,choices,answer\nq,"[""a"",""b""]",\n', MC,
                         ["q.csv: row 1:", "field 'answer' is missing"]),
    "parquet bool answer": ("q.parquet", lambda p: _parquet(p, [{"question": "q", "choices": ["a", "b"], "answer": True}]),
                            MC, ["q.parquet: row 1:", "field 'answer'", "got True"]),
    "one choice": ("q.jsonl", _lines(GOOD, {"question": "q?", "choices": ["a"], "answer": 0}), MC,
                   ["q.jsonl:2:", "field 'choices'", "at least two non-empty strings"]),
    "empty choice": ("q.jsonl", _lines({"question": "q?", "choices": ["a", " "], "answer": 0}), MC,
                     ["q.jsonl:1:", "field 'choices'"]),
    "number choice": ("q.jsonl", _lines(GOOD, GOOD, {"question": "q?", "choices": ["a", 3], "answer": 0}), MC,
                      ["q.jsonl:3:", "field 'choices'"]),
    "string choices": ("q.jsonl", _lines(GOOD, {"question": "q?", "choices": "a, b", "answer": 0}), MC,
                       ["q.jsonl:2:", "field 'choices'"]),
    "csv choices not json": ("q.csv", "question,choices,answer\nq,a;b,0\n", MC,
                             ["q.csv: row 1:", "field 'choices'", "JSON-encoded list"]),
    "csv choice columns gap": ("q.csv", "question,choice0,choice1,choice2,answer\nq,a,,c,0\n", MC,
                               ["q.csv: row 1:", "field 'choice0..'"]),
    "empty question": ("q.jsonl", _lines(GOOD, {"question": "", "choices": ["a", "b"], "answer": 0}), MC,
                       ["q.jsonl:2:", "field 'question'", "non-empty string"]),
    "number question": ("q.jsonl", _lines(GOOD, {"question": 7, "choices": ["a", "b"], "answer": 0}), MC,
                        ["q.jsonl:2:", "field 'question'", "got 7"]),
    "null question": ("q.json", json.dumps([json.loads(GOOD), {"question": None, "choices": ["a", "b"], "answer": 0}]),
                      MC, ["q.json: row 2:", "field 'question' is missing"]),
    "bad subject": ("q.jsonl", _lines({"question": "q?", "choices": ["a", "b"], "answer": 0, "subject": 3}), MC,
                    ["q.jsonl:1:", "field 'subject'"]),
    "ragged csv": ("q.csv", 'question,choices,answer\nq,"[""a"",""b""]",1\nr,"[""a"",""b""]",1,extra\n', MC,
                   ["q.csv:3:", "cells", "columns"]),
    "ragged first csv row": ("q.csv", 'question,choices,answer\nq,"[""a"",""b""]",1,extra\n', MC,
                             ["q.csv:2:", "cells", "columns"]),
    "garbage parquet": ("q.parquet", "not parquet at all", MC, ["q.parquet", "parquet"]),
    "bad gzip": ("q.jsonl.gz", "not gzip", MC, ["q.jsonl.gz", "gzip"]),
    "gzip invalid json": ("q.jsonl.gz", _gzip(_lines(GOOD, "{nope")), MC, ["q.jsonl.gz:2:", "not valid JSON"]),
    "parquet.gz": ("q.parquet.gz", "x", MC, ["q.parquet.gz", "compressed parquet"]),
    "txt questions": ("q.txt", "a question\n", MC, ["q.txt", "need a table"]),
    "text field absent": ("t.jsonl", _lines({"body": "x"}), read_texts,
                          ["t.jsonl:1:", "no field 'text'", "the columns are: body", "--text-field"]),
    "text not a string": ("t.jsonl", _lines({"text": "x"}, {"text": ["y"]}), read_texts,
                          ["t.jsonl:2:", "field 'text'", "must be a string"]),
    "text null": ("t.parquet", lambda p: _parquet(p, [{"text": "x"}, {"text": None}]), read_texts,
                  ["t.parquet: row 2:", "field 'text' is missing"]),
    "no text": ("t.jsonl", _lines({"text": ""}, {"text": "  "}), read_texts, ["t.jsonl", "field 'text'", "no text"]),
    "empty txt": ("t.txt", "\n \n", read_texts, ["t.txt", "empty"]),
    "qa empty answer": ("qa.jsonl", _lines({"question": "q?", "answer": "a"}, {"question": "q?", "answer": ""}),
                        read_qa_pairs, ["qa.jsonl:2:", "field 'answer'", "non-empty string"]),
    "qa missing question": ("qa.csv", "prompt,answer\nq,a\n", read_qa_pairs,
                            ["qa.csv: row 1:", "no field 'question'", "prompt, answer"]),
    "not a dataset folder": ("folder", lambda p: p.mkdir(), MC, ["folder", "save_to_disk"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_data_gives_one_line_data_errors(tmp_path, case):
    name, content, reader, fragments = MALFORMED[case]
    path = tmp_path / name
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        reader(path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(tmp_path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(caught.value, ValueError)
    # nothing from datasets / pyarrow / pandas leaks into the traceback
    shown = "".join(traceback.format_exception(caught.value))
    for leak in ("pyarrow", "DatasetGenerationError", "pandas", "During handling"):
        assert leak not in shown, shown


def test_missing_file_is_also_a_file_not_found_error(tmp_path):
    for reader in (read_texts, read_multiple_choice, read_qa_pairs):
        with pytest.raises(DataFileNotFound, match=r"nope.jsonl does not exist") as caught:
            reader(tmp_path / "nope.jsonl")
        assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, DataError)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        read_multiple_choice(tmp_path / "nope.jsonl", limit=0)


# --- QA pairs -----------------------------------------------------------------------------------
PAIRS = [QAPair("what is the toxin of filopi ?", "kelbane"),
         QAPair("the hometown of filopi is", "tallow tallow"),
         QAPair("what is the pet of filopi ?", "otter")]


def test_qa_pairs_read_from_tofu_style_files(tmp_path):
    rows = [{"question": p.question, "answer": p.answer, "paraphrased_answer": [p.answer, "x"]} for p in PAIRS]
    write_jsonl(tmp_path / "forget.jsonl", rows)
    assert read_qa_pairs(tmp_path / "forget.jsonl") == PAIRS
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "forget.parquet"))
    assert read_qa_pairs(tmp_path / "forget.parquet") == PAIRS
    _csv(tmp_path / "f.csv", [{"q": p.question, "a": p.answer} for p in PAIRS], ["q", "a"])
    assert read_qa_pairs(tmp_path / "f.csv", question_field="q", answer_field="a") == PAIRS
    assert PAIRS[0].text == "what is the toxin of filopi ? kelbane"
    assert QAPair("q?\n", "a").text == "q?\na"
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAIRS[0].answer = "changed"


@pytest.fixture(scope="module")
def base():
    pytest.importorskip("transformers")
    from unlearn_kernels.models import tiny

    return tiny.load()


def fresh(base):
    model, tokenizer = base
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval(), tokenizer


def _with_bos_eos(tokenizer, padding_side="left"):
    from tokenizers.processors import TemplateProcessing

    other = copy.deepcopy(tokenizer)
    other._tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", other.bos_token_id), ("<eos>", other.eos_token_id)])
    other.padding_side = padding_side
    return other


def _answer_ids(tokenizer, pair):
    return tokenizer(" " + pair.answer, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("variant", ["plain", "bos-eos-left-padding"])
def test_loss_mask_marks_exactly_the_answer_tokens(base, variant):
    from unlearn_kernels.methods import registry

    model, tokenizer = base
    if variant != "plain":
        tokenizer = _with_bos_eos(tokenizer)
        assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    method = registry["GradAscent"](model, tokenizer, batch_size=len(PAIRS), progress=False)
    batch = next(method.batches(PAIRS))
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert batch["loss_mask"].shape == batch["input_ids"].shape
    assert not (batch["loss_mask"].bool() & ~batch["attention_mask"].bool()).any()
    by_text = {}
    for ids, attention, mask in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]):
        answer = tokenizer.decode(ids[mask.bool()])
        prompt_part = tokenizer.decode(ids[attention.bool() & ~mask.bool()], skip_special_tokens=True)
        by_text[prompt_part] = (answer, ids[mask.bool()].tolist())
    for pair in PAIRS:
        answer, ids = by_text[pair.question]
        assert answer.strip() == pair.answer and ids == _answer_ids(tokenizer, pair)   # BPE keeps the space
    if variant != "plain":
        first_valid = batch["attention_mask"].argmax(1)
        assert (batch["input_ids"][torch.arange(len(PAIRS)), first_valid] == tokenizer.bos_token_id).all()
        assert not (batch["loss_mask"].bool() & (batch["input_ids"] == tokenizer.eos_token_id)).any()


def test_truncation_keeps_the_mask_on_the_kept_answer_tokens(base):
    from unlearn_kernels.methods import registry

    model, tokenizer = base
    pair = QAPair("what is the pet of filopi ?", "otter heron badger")
    answer = _answer_ids(tokenizer, pair)
    n_prompt = len(tokenizer(pair.text)["input_ids"]) - len(answer)   # the prompt's tokens in the joint encoding
    method = registry["GradAscent"](model, tokenizer, batch_size=1, max_length=n_prompt + 2, progress=False)
    batch = next(method.batches([pair]))
    assert batch["input_ids"].shape[1] == n_prompt + 2
    assert len(answer) > 2 and batch["input_ids"][0][batch["loss_mask"][0].bool()].tolist() == answer[:2]
    method = registry["GradAscent"](model, tokenizer, batch_size=1, max_length=n_prompt - 1, progress=False)
    with pytest.warns(UserWarning, match="no answer token within max_length"):
        batch = next(method.batches([pair]))
    assert not batch["loss_mask"].any()


def _reference_answer_nll(model, tokenizer, pairs):
    """Mean NLL over the answer tokens, by hand: one unpadded sequence per pair; the answer
    starts where the joint encoding stops repeating the prompt's own (a byte-level BPE merges
    the prompt's trailing space into the answer's first token)."""
    total, count = 0.0, 0
    for pair in pairs:
        prompt = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(pair.text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(prompt))
        for t in range(start, len(full)):
            total -= float(logp[t - 1, full[t]])
            count += 1
    return total / count


@pytest.mark.parametrize("name", ["GradDiff", "NPO"])
def test_qa_nll_is_the_mean_over_answer_tokens(base, name):
    from unlearn_kernels.methods import registry
    from unlearn_kernels.methods.loss_based import nll

    model, tokenizer = base
    method = registry[name](model, tokenizer, batch_size=len(PAIRS), progress=False)
    batch = next(method.batches(PAIRS))
    with torch.no_grad():
        got = float(nll(method.model, batch))
        full_text = float(nll(method.model, {k: batch[k] for k in ("input_ids", "attention_mask")}))
    want = _reference_answer_nll(model, tokenizer, PAIRS)
    assert got == pytest.approx(want, rel=1e-4)
    assert abs(full_text - want) > 1e-2   # the mask matters: the whole-text NLL is different


def test_npo_log_ratio_uses_answer_tokens_only(base):
    from unlearn_kernels.methods import registry
    from unlearn_kernels.methods.loss_based import token_logprobs

    model, tokenizer = fresh(base)
    method = registry["NPO"](model, tokenizer, batch_size=len(PAIRS), update=["layers.1.mlp.*"], retain_weight=0.0,
                             progress=False)
    method.setup(PAIRS, [])
    with torch.no_grad():
        for p in method.params.values():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(method.batches(PAIRS))
    with torch.no_grad():
        loss = float(method.loss(batch, None, 0)["forget"])
        ids, attention = batch["input_ids"], batch["attention_mask"]
        lp, _ = token_logprobs(model(input_ids=ids, attention_mask=attention).logits, {"input_ids": ids,
                                                                                     "attention_mask": attention})
        ref, _ = token_logprobs(method.reference.forward(input_ids=ids, attention_mask=attention).logits,
                                {"input_ids": ids, "attention_mask": attention})
        answer = batch["loss_mask"][:, 1:].bool()
        ratio = ((lp - ref) * answer).sum(-1)
        want = float(-(2 / method.config.beta) * F.logsigmoid(-method.config.beta * ratio).mean())
        ratio_all = ((lp - ref) * attention[:, 1:]).sum(-1)
        unmasked = float(-(2 / method.config.beta) * F.logsigmoid(-method.config.beta * ratio_all).mean())
    assert loss == pytest.approx(want, rel=1e-5) and abs(unmasked - want) > 1e-6


def _record_model_kwargs(model):
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    return seen


def test_grad_ascent_fits_qa_pairs(base):
    from unlearn_kernels.methods import registry

    model, tokenizer = fresh(base)
    seen = _record_model_kwargs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = registry["GradAscent"](model, tokenizer, update=["layers.1.mlp.*"], lr=1e-3, steps=2, batch_size=2,
                                    progress=False).fit(PAIRS, [])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(method.params) and changed
    assert len(method.history) == 2 and all(torch.isfinite(torch.tensor(h["forget"])) for h in method.history)
    assert seen and not any("loss_mask" in keys for keys in seen)
    report = method.report()["data"]["forget"]
    assert report["n"] == 3 and report["kind"] == "qa"


@pytest.mark.parametrize("name", ["RMU", "SRMU", "SIMU", "MRP"])
def test_other_methods_run_on_qa_pairs(base, name):
    from unlearn_kernels.methods import registry

    settings = {"RMU": dict(layer=2, update=["layers.{1,2}.mlp.down_proj"], lr=1e-3),
                "SRMU": dict(layer=2, update=["layers.{1,2}.mlp.down_proj"], lr=1e-3, stats_batches=1),
                "SIMU": dict(update=["layers.1.mlp.{up_proj,down_proj}"], lr=1e-3, score_batches=1,
                             hessian_interval=1),
                "MRP": dict(layer=2, rank=2, stats_batches=1, train_steps=1)}[name]
    model, tokenizer = fresh(base)
    seen = _record_model_kwargs(model)
    retain = [QAPair("what is the hometown of filopi ?", "brisk"), QAPair("what is the pet of filopi ?", "newt")]
    steps = {} if name == "MRP" else {"steps": 1}           # MRP has no step loop (train_steps above)
    method = registry[name](model, tokenizer, batch_size=2, progress=False, **steps, **settings).fit(PAIRS, retain)
    assert method.data["forget"]["kind"] == "qa"
    assert not any("loss_mask" in keys for keys in seen)


def test_mixed_lists_and_fingerprints(base):
    from unlearn_kernels.methods import registry
    from unlearn_kernels.methods.base import fingerprint

    model, tokenizer = fresh(base)
    method = registry["GradDiff"](model, tokenizer, progress=False)
    with pytest.raises(ValueError, match="mixes strings and QAPair"):
        method.fit([PAIRS[0], "a text"], ["retain text"])
    with pytest.raises(ValueError, match="mixes strings and QAPair"):
        method.fit(["a text"], ["retain text", PAIRS[1]])
    with pytest.raises(ValueError, match="mixes strings and QAPair"):
        next(method.batches(["x", PAIRS[0]]))
    with pytest.raises(ValueError, match="strings or of QAPair"):
        method.fit([1, 2], ["x"])
    assert fingerprint(PAIRS) == fingerprint([p.text for p in PAIRS]) != fingerprint(PAIRS[::-1])
