"""tools/preprocess_data.py and the library function behind it."""

import json
import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models

from longcat.data.corpus import preprocess_files, train_bpe_tokenizer
from longcat.data.indexed import IndexedDataset
from longcat.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


@pytest.fixture
def tokenizer_path(tmp_path):
    path = str(tmp_path / "tokenizer.json")
    train_bpe_tokenizer(["alpha beta gamma delta"] * 10, vocab_size=300, progress=False).save(path)
    return path


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_jsonl_and_txt_inputs(tmp_path, tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    jsonl = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"body": "alpha beta"}), "", json.dumps({"body": "gamma"})])
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "1.txt").write_text("delta\ndelta")
    prefix = str(tmp_path / "out" / "p")
    stats = preprocess_files([jsonl, str(tmp_path / "docs")], tokenizer_path=tokenizer_path, output_prefix=prefix,
                             json_key="body", append_eod=True, progress=False)
    ds = IndexedDataset(prefix)
    assert stats.num_documents == ds.num_documents == 3 and stats.num_tokens == ds.num_tokens
    assert [tok.decode(ds.document(d).tolist()) for d in range(3)] == [
        "alpha beta<|endoftext|>", "gamma<|endoftext|>", "delta\ndelta<|endoftext|>"]


def test_malformed_line_names_file_and_line(tmp_path, tokenizer_path):
    lines = [json.dumps({"text": "alpha"}), "{broken", json.dumps({"text": 3}), json.dumps(["x"]),
             json.dumps({"other": "y"}), json.dumps({"text": "beta"})]
    jsonl = write_jsonl(tmp_path / "bad.jsonl", lines)
    prefix = str(tmp_path / "p")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON.*--skip-bad-lines"):
        preprocess_files([jsonl], tokenizer_path=tokenizer_path, output_prefix=prefix, progress=False)
    assert not any(p.name.startswith("p.") for p in tmp_path.iterdir())  # nothing half-written
    for line_number, problem in [(3, "is a int, not a string"), (4, "expected a JSON object"), (5, "no 'text' field")]:
        good = [json.dumps({"text": "a"})] * (line_number - 1)
        only = write_jsonl(tmp_path / f"l{line_number}.jsonl", good + [lines[line_number - 1]])
        with pytest.raises(ValueError, match=rf"l{line_number}\.jsonl:{line_number}: .*{problem}"):
            preprocess_files([only], tokenizer_path=tokenizer_path, output_prefix=prefix, progress=False)
    stats = preprocess_files([jsonl], tokenizer_path=tokenizer_path, output_prefix=prefix, skip_bad_lines=True,
                             progress=False)
    assert (stats.num_documents, stats.skipped_lines) == (2, 4)


def test_bad_inputs(tmp_path, tokenizer_path):
    prefix = str(tmp_path / "p")
    with pytest.raises(ValueError, match="does not exist"):
        preprocess_files([str(tmp_path / "nope.jsonl")], tokenizer_path=tokenizer_path, output_prefix=prefix)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unsupported extension '.csv'"):
        preprocess_files([str(tmp_path / "x.csv")], tokenizer_path=tokenizer_path, output_prefix=prefix)
    empty = write_jsonl(tmp_path / "e.jsonl", ["{bad"])
    good = write_jsonl(tmp_path / "g.jsonl", [json.dumps({"text": "alpha"})])
    preprocess_files([good], tokenizer_path=tokenizer_path, output_prefix=prefix, progress=False)
    with pytest.raises(ValueError, match=r"no documents to write to .*p: .*every line was skipped"):
        preprocess_files([empty], tokenizer_path=tokenizer_path, output_prefix=prefix, skip_bad_lines=True,
                         progress=False)
    assert IndexedDataset(prefix).num_documents == 1  # the earlier output survives
    plain = str(tmp_path / "plain.json")
    Tokenizer(models.BPE()).save(plain)
    with pytest.raises(ValueError, match=r"plain\.json has no '<\|endoftext\|>' token"):
        preprocess_files([empty], tokenizer_path=plain, output_prefix=prefix)


def test_cli(tmp_path, tokenizer_path):
    jsonl = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"text": "alpha"}), "nope"])
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)

    assert "--skip-bad-lines" in run("--help").stdout
    base = ["--input", jsonl, "--tokenizer", tokenizer_path, "--output-prefix", str(tmp_path / "o"), "--no-progress"]
    failed = run(*base)
    assert failed.returncode == 1 and "c.jsonl:2: malformed JSON" in failed.stderr
    ok = run(*base, "--skip-bad-lines", "--append-eod")
    assert ok.returncode == 0 and "1 documents" in ok.stderr and "skipped 1 bad lines" in ok.stderr
    assert IndexedDataset(str(tmp_path / "o")).num_documents == 1


def test_append_eod_leaves_an_empty_text_without_tokens(tmp_path, tokenizer_path):
    """As Megatron-LM's preprocessing: an empty document gets no [EOD] (it would be a one-token document)."""
    jsonl = write_jsonl(tmp_path / "e.jsonl", [json.dumps({"text": "alpha"}), json.dumps({"text": ""}),
                                               json.dumps({"text": "beta"})])
    prefix = str(tmp_path / "p")
    stats = preprocess_files([jsonl], tokenizer_path=tokenizer_path, output_prefix=prefix, append_eod=True,
                             progress=False)
    ds = IndexedDataset(prefix)
    assert stats.num_documents == ds.num_documents == 3
    assert [len(ds.document(d)) for d in range(3)][1] == 0
    assert stats.num_tokens == ds.num_tokens == len(ds.document(0)) + len(ds.document(2))
