"""Bad input, end to end through the training CLI: a clear error naming the file and the problem, before
training starts, a non-zero exit, and nothing half-done in ``train.out_dir``.

Each case runs ``python -m longcat.train`` (one real interpreter launch below; the rest through
``longcat.testing.jobs.run_cli``, the same ``python -m longcat.train`` in a process forked from a preloaded
server, which saves a torch import per case). The unit tests in tests/unit/data cover the same
readers function by function; ``tools/preprocess_data.py``'s malformed-line errors and skip counts are
covered end to end by tests/unit/data/test_preprocess_data.py::test_cli.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_VOCAB, tiny_overrides
from tokenizers import Tokenizer, models, pre_tokenizers

from longcat.data.corpus import preprocess_files
from longcat.data.indexed import write_indexed_dataset
from longcat.testing.checkpoints import check_checkpoint_folder
from longcat.testing.faults import FaultPlan
from longcat.testing.jobs import run_cli, worker_env

pytestmark = pytest.mark.timeout(300)


def _word_level_tokenizer(path: Path, *, eod_id: int, size: int) -> str:
    """A tokenizer.json of ``size`` ids whose <|endoftext|> is ``eod_id`` (<|pad|> the next id)."""
    words = [f"w{i}" for i in range(size - 2)]
    words[eod_id:eod_id] = ["<|endoftext|>", "<|pad|>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return str(path)


def _copy_pair(src: str, dst: str) -> str:
    for ext in (".bin", ".idx"):
        shutil.copyfile(src + ext, dst + ext)
    return dst


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture(scope="module")
def inputs(corpus_cache, tmp_path_factory):
    """Every broken input, next to a good pair preprocessed (with its tokenizer record) from stdlib text."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tokenizer = str(next(Path(corpus_cache).glob("*/tokenizer.json")))
    text = Path(json.__file__).read_text()
    docs = [text[i:i + 600] for i in range(0, 36_000, 600)]
    (root / "good.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    good = str(root / "good")
    preprocess_files([str(root / "good.jsonl")], tokenizer_path=tokenizer, output_prefix=good, append_eod=True,
                     progress=False)
    rng = np.random.default_rng(0)
    paths = {"tokenizer": tokenizer, "good": good}
    paths["truncated_bin"] = _copy_pair(good, str(root / "truncated_bin"))
    os.truncate(paths["truncated_bin"] + ".bin", os.path.getsize(good + ".bin") - 2)
    paths["bad_magic"] = _copy_pair(good, str(root / "bad_magic"))
    _patch(paths["bad_magic"] + ".idx", 0, b"NOTANIDX!")
    paths["version2"] = _copy_pair(good, str(root / "version2"))
    _patch(paths["version2"] + ".idx", 9, struct.pack("<Q", 2))
    paths["dtype9"] = _copy_pair(good, str(root / "dtype9"))
    _patch(paths["dtype9"] + ".idx", 17, bytes([9]))
    paths["truncated_idx"] = _copy_pair(good, str(root / "truncated_idx"))
    os.truncate(paths["truncated_idx"] + ".idx", 60)
    paths["big_ids"] = str(root / "big_ids")  # tokenized with a 1000-id vocabulary
    write_indexed_dataset(paths["big_ids"], [rng.integers(0, 1000, 80) for _ in range(40)], vocab_size=1000)
    paths["small_ids"] = str(root / "small_ids")  # every id below 290
    write_indexed_dataset(paths["small_ids"], [rng.integers(2, 290, 80) for _ in range(40)], vocab_size=1000)
    paths["empty"] = str(root / "empty")
    write_indexed_dataset(paths["empty"], [], vocab_size=1000)
    paths["tiny"] = str(root / "tiny")  # two 5-token documents: no split holds a 33-token sample
    write_indexed_dataset(paths["tiny"], [[5, 6, 7, 8, 0], [9, 10, 11, 12, 0]], vocab_size=1000)
    paths["no_record"] = _copy_pair(good, str(root / "no_record"))  # Megatron-made: no .meta.json
    paths["tok_eod5"] = _word_level_tokenizer(root / "tok_eod5.json", eod_id=5, size=TEST_VOCAB)
    paths["tok_small"] = _word_level_tokenizer(root / "tok_small.json", eod_id=0, size=50)

    user, answer = {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5."}
    good_chat = json.dumps({"messages": [user, answer]})
    (root / "malformed.jsonl").write_text(f"{good_chat}\n{{\"messages\": [\n{good_chat}\n")
    (root / "roles.jsonl").write_text(f"{good_chat}\n{good_chat}\n{json.dumps({'messages': [answer, user]})}\n")
    (root / "skippable.jsonl").write_text("\n".join([good_chat] * 6 + ["not json", json.dumps({"messages": [answer]})])
                                          + "\n")
    (root / "half_written" / "step_00000003.tmp").mkdir(parents=True)
    return paths


def _files(inputs, prefix_key: str, tokenizer_key: str = "tokenizer", **extra) -> dict:
    return {"data.corpus": "files", "data.tokenizer": inputs[tokenizer_key],
            "data.sources": f"[{{path: {inputs[prefix_key]}, weight: 1.0}}]", **extra}


def _sft(inputs, name: str, **extra) -> dict:
    root = Path(inputs["good"]).parent
    return {"data.corpus": "sft", "data.tokenizer": inputs["tokenizer"], "data.sft_path": str(root / name),
            "data.sft_overflow": "truncate", **extra}


CASES = {  # id: (overrides from the inputs, message regex)
    "bin-truncated": (lambda i: _files(i, "truncated_bin"), r"truncated_bin\.bin is truncated"),
    "idx-truncated": (lambda i: _files(i, "truncated_idx"), r"truncated_idx\.idx is truncated"),
    "idx-corrupt-magic": (lambda i: _files(i, "bad_magic"),
                          r"bad_magic\.idx does not start with Megatron's index magic"),
    "idx-version": (lambda i: _files(i, "version2"), r"version2\.idx has index version 2; only version 1"),
    "idx-dtype": (lambda i: _files(i, "dtype9"), r"dtype9\.idx has dtype code 9; supported codes"),
    "missing-prefix": (lambda i: _files(i, "good") | {"data.sources": "[{path: /nonexistent/x, weight: 1.0}]"},
                       r"/nonexistent/x\.idx does not exist"),
    "ids-over-model-vocab": (lambda i: _files(i, "big_ids"),
                             r"big_ids\.bin holds token id 9\d\d >= the model's vocab_size 512"),
    "empty-dataset": (lambda i: _files(i, "empty"), r"empty\.bin is empty \(0 documents, 0 tokens\)"),
    "empty-split": (lambda i: _files(i, "tiny"),
                    r"the train split of \S+tiny\.bin has \d+ tokens .* fewer than seq_length \+ 1 = 33"),
    "tokenizer-over-model-vocab": (lambda i: _files(i, "small_ids", **{"model.vocab_size": 300}),
                                   r"the tokenizer \S+tokenizer\.json has \d+ ids but model\.vocab_size=300"),
    "tokenizer-eod-differs-from-record": (lambda i: _files(i, "good", "tok_eod5"),
                                          r"good\.bin .* was tokenized with end-of-document id 0 but the tokenizer "
                                          r"\S+tok_eod5\.json's <\|endoftext\|> is 5"),
    "tokenizer-vocab-differs-from-record": (lambda i: _files(i, "good", "tok_small"),
                                            r"good\.bin .* was tokenized with a different tokenizer"),
    "tokenizer-too-small-no-record": (lambda i: _files(i, "no_record", "tok_small"),
                                      r"no_record\.bin holds token id \d+ "
                                      r"but the tokenizer \S+tok_small\.json has only 50 ids"),
    "sft-malformed-jsonl": (lambda i: _sft(i, "malformed.jsonl"),
                            r"malformed\.jsonl:2: malformed JSON .* data\.sft_skip_bad_lines=true"),
    "sft-roles-out-of-order": (lambda i: _sft(i, "roles.jsonl"),
                               r"roles\.jsonl:3: message 0 \(assistant\): assistant turn before any user turn"),
    "init-from-half-written-checkpoint": (
        lambda i: {"train.init_from": str(Path(i["good"]).parent / "half_written" / "step_00000003.tmp")},
        r"step_00000003\.tmp is not a complete longcat checkpoint"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_training_naming_file_and_problem(case, inputs, corpus_cache, tmp_path):
    make, message = CASES[case]
    out = tmp_path / "run"
    rc, log = run_cli(tiny_overrides(corpus_cache, str(out), **make(inputs)), log_dir=tmp_path / "logs")
    assert rc == 2, log[-3000:]
    error = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and re.search(message, error[0]), log[-3000:]
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())  # nothing half-done


def test_real_interpreter_launch_reports_the_same_error(inputs, corpus_cache, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "longcat.train", *tiny_overrides(corpus_cache, str(out), **_files(inputs, "version2"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=worker_env())
    assert proc.returncode == 2 and "version2.idx has index version 2" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_skipped_sft_lines_are_counted_and_training_runs(inputs, corpus_cache, tmp_path):
    overrides = tiny_overrides(corpus_cache, str(tmp_path / "run"), **_sft(inputs, "skippable.jsonl"), **{
        "data.sft_skip_bad_lines": "true", "train.steps": 1, "train.eval_interval": 0, "train.checkpoint_interval": 0,
        "optim.warmup_steps": 0})
    rc, log = run_cli(overrides, log_dir=tmp_path / "logs")
    assert rc == 0, log[-3000:]
    assert "skippable.jsonl" in log and "num_skipped_lines=2" in log


def test_checkpoint_of_another_model_config_is_refused_and_left_alone(corpus_cache, tmp_path):
    out = tmp_path / "run"
    first = {"train.steps": 1, "train.checkpoint_interval": 1, "train.eval_interval": 0, "optim.warmup_steps": 0}
    rc, log = run_cli(tiny_overrides(corpus_cache, str(out), **first), log_dir=tmp_path / "first")
    assert rc == 0, log[-3000:]
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    rc, log = run_cli(tiny_overrides(corpus_cache, str(out), **first, **{"model.hidden_size": 64}),
                      log_dir=tmp_path / "second")
    assert rc == 2 and "different model config (hidden_size: checkpoint 32 != run 64)" in log, log[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before


def test_checkpoint_damaged_after_writing_is_named_and_the_older_one_remains_usable(corpus_cache, tmp_path):
    out = tmp_path / "run"
    overrides = {"train.steps": 2, "train.checkpoint_interval": 1, "train.eval_interval": 0, "optim.warmup_steps": 0}
    rc, log = run_cli(tiny_overrides(corpus_cache, str(out), **overrides), log_dir=tmp_path / "first")
    assert rc == 0, log[-3000:]
    latest = out / "checkpoints" / "step_00000002"
    shard = next(latest.glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size // 2)  # bit rot, a cut copy
    overrides["train.steps"] = 3
    rc, log = run_cli(tiny_overrides(corpus_cache, str(out), **overrides), log_dir=tmp_path / "second")
    assert rc == 2, log[-3000:]
    assert re.search(r"error: cannot read checkpoint \S+step_00000002: .*move it aside .* the older complete "
                     r"checkpoints are \['step_00000001'\]", log), log[-3000:]
    latest.rename(latest.with_name("step_00000002.damaged"))
    rc, log = run_cli(tiny_overrides(corpus_cache, str(out), **overrides), log_dir=tmp_path / "third")
    assert rc == 0 and "step_00000001 at step 1" in log, log[-3000:]


@pytest.mark.parametrize("phase", ["shards@4:1", "state@4:0"])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(phase, corpus_cache, tmp_path):
    """ENOSPC on one rank while writing step 4 (its shard files, or rank 0's trainer state): every rank
    fails with the same clear error, step 4 leaves nothing behind, step 2 stays, and the run resumes."""
    out = tmp_path / "run"
    overrides = tiny_overrides(corpus_cache, str(out), **{
        "parallel.ep": 2, "train.steps": 6, "train.checkpoint_interval": 2, "train.eval_interval": 0})
    rc, log = run_cli(overrides, log_dir=tmp_path / "full", nproc=2, faults=FaultPlan(save_error=phase))
    assert rc == 1, log[-3000:]
    rank = phase[-1]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, log[-3000:]  # both ranks, one line each, no traceback
    for line in errors:
        assert "[Errno 28] could not write checkpoint" in line and "step_00000004" in line
        assert f"rank {rank}: [Errno 28] No space left on device" in line
        assert "step_00000002 is intact" in line
    assert "Traceback" not in log
    folder = check_checkpoint_folder(out / "checkpoints", world_size=2)
    assert folder.complete_steps == (2,) and not folder.leftovers, folder

    rc, log = run_cli(overrides, log_dir=tmp_path / "resumed", nproc=2)
    assert rc == 0 and "step_00000002 at step 2" in log, log[-3000:]
