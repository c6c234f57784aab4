"""Corpora to ``.bin/.idx``: the embedded stdlib corpus, and JSONL/text files (preprocess_data).

The default corpus is the running interpreter's standard-library ``.py`` sources (about 12 MB
without the test suites, ~730 files), one document per file in sorted path order. A byte-level BPE
tokenizer is trained on it with ``tokenizers``, and the tokenized documents (each followed by
``<|endoftext|>``, as Megatron's ``--append-eod``) are written to a cache directory with a manifest;
a later call whose inputs match the manifest returns at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from longcat.atomic_files import write_text_atomic
from longcat.data.chat import CHAT_SPECIAL_TOKENS
from longcat.data.indexed import IndexedDatasetWriter, bin_path, idx_path, optimal_dtype
from longcat.data.provenance import remove_data_record, write_data_record
from longcat.data.tokenizer import EOD_TOKEN, PAD_TOKEN, TextTokenizer, load_tokenizer

CORPUS_FORMAT_VERSION = 2  # bump when the preparation changes, to invalidate old caches
DEFAULT_STDLIB_CACHE_DIR = os.path.join(".cache", "longcat", "stdlib")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_ENCODE_BATCH_DOCUMENTS = 256


class CorpusPaths(NamedTuple):
    prefix: str  # PREFIX of PREFIX.bin/.idx
    tokenizer_path: str  # the tokenizer.json that tokenized it


@dataclasses.dataclass
class TokenizeStats:
    num_documents: int = 0
    num_tokens: int = 0
    num_bytes: int = 0
    skipped_lines: int = 0  # malformed JSONL lines skipped (--skip-bad-lines)


# ---------------------------------------------------------------------------------------------
# The stdlib corpus


def stdlib_root() -> Path:
    """The folder the default corpus is read from: this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(*, max_bytes: int = 0) -> list[Path]:
    """Sorted stdlib ``.py`` files, excluding site-packages and test suites.

    With ``max_bytes > 0``, the longest prefix of that sorted list whose sizes sum to at most
    ``max_bytes``.
    """
    root = stdlib_root()
    files: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS]
        files.extend(Path(directory, n) for n in names if n.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_bytes > 0:
        kept, total = [], 0
        for path in files:
            total += path.stat().st_size
            if total > max_bytes:
                break
            kept.append(path)
        files = kept
    return files


def _fingerprint(files: Sequence[Path]) -> str:
    """sha256 over (relative path, size, mtime) of ``files``: changes whenever the stdlib does."""
    root = stdlib_root()
    digest = hashlib.sha256()
    for path in files:
        st = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stdlib_cache_dir(cache_root: str, *, vocab_size: int, max_bytes: int) -> str:
    """``CACHE_ROOT/stdlib`` for the defaults (vocab 8192, no cap), else a directory per variant."""
    if vocab_size == 8192 and max_bytes == 0:
        return os.path.join(cache_root, "stdlib")
    return os.path.join(cache_root, f"stdlib-v{vocab_size}" + (f"-max{max_bytes}" if max_bytes else ""))


def prepare_stdlib_corpus(
    cache_dir: str = DEFAULT_STDLIB_CACHE_DIR, *, vocab_size: int = 8192, max_bytes: int = 0,
    tokenizer_path: str = "", progress: bool = True,
) -> CorpusPaths:
    """Build (or find cached) the stdlib corpus: ``CACHE_DIR/{tokenizer.json, stdlib.bin, stdlib.idx}``.

    Args:
        cache_dir: output directory; created. Concurrent callers (e.g. every rank) serialize on a
            file lock in it, so only the first builds.
        vocab_size: size of the BPE tokenizer trained on the corpus (>= 263: 256 bytes + 7 specials).
        max_bytes: 0 for the whole stdlib, else a cap on the source bytes (quick tests).
        tokenizer_path: an existing tokenizer.json to use instead of training one (vocab_size is then
            ignored); it is copied into the cache.
        progress: tqdm bars on stderr.

    Returns:
        CorpusPaths(prefix, tokenizer_path).

    Raises:
        ValueError: for vocab_size < 263, or when max_bytes admits no file.
    """
    if not tokenizer_path and vocab_size < 263:
        raise ValueError(f"vocab_size={vocab_size} must be >= 263 (256 byte tokens + 7 special tokens)")
    files = stdlib_source_files(max_bytes=max_bytes)
    if not files:
        raise ValueError(
            f"max_bytes={max_bytes} admits no stdlib file (the first is "
            f"{stdlib_source_files()[0].stat().st_size} bytes); raise it or use 0 for the whole corpus"
        )
    byte_count = sum(p.stat().st_size for p in files)
    expected = {
        "format_version": CORPUS_FORMAT_VERSION,
        "python_version": sys.version.split()[0],
        "stdlib_dir": str(stdlib_root()),
        "file_count": len(files),
        "byte_count": byte_count,
        "fingerprint": _fingerprint(files),
        "vocab_size_requested": None if tokenizer_path else vocab_size,
        "max_bytes": max_bytes,
        "tokenizer_sha256": _file_sha256(tokenizer_path) if tokenizer_path else None,
    }
    os.makedirs(cache_dir, exist_ok=True)
    paths = CorpusPaths(os.path.join(cache_dir, "stdlib"), os.path.join(cache_dir, "tokenizer.json"))
    manifest_path = os.path.join(cache_dir, "manifest.json")
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _cache_matches(manifest_path, expected, paths):
            return paths
        texts = [read_source(p) for p in tqdm(files, desc="read stdlib", disable=not progress, unit="file")]
        if tokenizer_path:
            tokenizer = load_tokenizer(tokenizer_path)
        else:
            tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, progress=progress)
        tokenizer.save(paths.tokenizer_path)
        stats = tokenize_to_indexed(
            texts, tokenizer=tokenizer, output_prefix=paths.prefix, append_eod=True, progress=progress,
            total_bytes=byte_count,
        )
        manifest = dict(expected, vocab_size=tokenizer.vocab_size, num_tokens=stats.num_tokens,
                        num_documents=stats.num_documents, dtype=optimal_dtype(tokenizer.vocab_size).name)
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
    return paths


def _cache_matches(manifest_path: str, expected: dict, paths: CorpusPaths) -> bool:
    files = [manifest_path, paths.tokenizer_path, bin_path(paths.prefix), idx_path(paths.prefix)]
    if not all(os.path.isfile(f) for f in files):
        return False
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return all(manifest.get(k) == v for k, v in expected.items())


def read_source(path: Path) -> str:
    """A source file's text as the corpus holds it: UTF-8, undecodable bytes replaced (a few stdlib
    files carry latin-1 bytes; replacement keeps the corpus deterministic and valid)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def train_bpe_tokenizer(texts: Sequence[str], *, vocab_size: int, progress: bool = True,
                        chat_tokens: bool = True) -> TextTokenizer:
    """Train a GPT-2-style byte-level BPE on ``texts`` (ids 0, 1 = ``<|endoftext|>``, ``<|pad|>``;
    with ``chat_tokens`` ids 2..6 are the LongCat-Flash chat markers of ``longcat.data.chat``).

    Raises:
        ValueError: for vocab_size < 263.
    """
    specials = [EOD_TOKEN, PAD_TOKEN, *(CHAT_SPECIAL_TOKENS if chat_tokens else ())]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(specials)} "
                         f"(256 byte tokens + {len(specials)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # ids 0, 1: document end and padding; 2..6: the LongCat-Flash chat markers (single tokens for SFT)
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return TextTokenizer(tokenizer)


# ---------------------------------------------------------------------------------------------
# Tokenizing documents (the stdlib corpus and tools/preprocess_data.py)


def tokenize_to_indexed(
    documents: Iterable[str], *, tokenizer: TextTokenizer, output_prefix: str, append_eod: bool,
    progress: bool = True, total_bytes: Optional[int] = None,
) -> TokenizeStats:
    """Tokenize ``documents`` in parallel batches and write ``OUTPUT_PREFIX.bin/.idx`` atomically.

    One sequence per document, dtype ``optimal_dtype(tokenizer.vocab_size)``; with ``append_eod``
    each document is followed by ``tokenizer.eod_id`` (Megatron's ``--append-eod``).

    Returns:
        TokenizeStats with the documents, tokens and UTF-8 bytes written.

    Raises:
        ValueError: when ``documents`` is empty (nothing is written), or as ``IndexedDatasetWriter``.
    """
    stats = TokenizeStats()
    dtype = optimal_dtype(tokenizer.vocab_size)
    bar = tqdm(total=total_bytes, desc="tokenize", unit="B", unit_scale=True, disable=not progress)
    with IndexedDatasetWriter(output_prefix, dtype=dtype) as writer:
        for batch in _batched(documents, _ENCODE_BATCH_DOCUMENTS):
            for ids in tokenizer.encode_batch(batch):
                if append_eod and ids:  # as Megatron-LM: an empty text stays a document with no tokens
                    ids.append(tokenizer.eod_id)
                writer.add_document(np.asarray(ids, dtype=dtype))
                stats.num_tokens += len(ids)
            num_bytes = sum(len(t.encode("utf-8")) for t in batch)
            stats.num_documents += len(batch)
            stats.num_bytes += num_bytes
            bar.update(num_bytes)
        bar.close()
        if stats.num_documents == 0:  # raised inside the writer, so no empty pair replaces a good one
            raise ValueError(
                f"no documents to write to {output_prefix}: the inputs are empty or every line was "
                "skipped as malformed; check --input and --json-key"
            )
        remove_data_record(output_prefix)  # the old pair's record must not outlive it
    write_data_record(output_prefix, tokenizer, append_eod=append_eod)
    return stats


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Input files: each path as given, directories expanded to their sorted .jsonl/.json/.txt files.

    Raises:
        ValueError: for a missing path, an unsupported extension, or no files at all.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".txt")))
        elif path.is_file():
            if path.suffix not in (".jsonl", ".json", ".txt"):
                raise ValueError(
                    f"input {path}: unsupported extension {path.suffix!r}; use .jsonl/.json (one JSON "
                    "object per line) or .txt (one document per file)"
                )
            files.append(path)
        else:
            raise ValueError(f"input {path} does not exist")
    if not files:
        raise ValueError(f"no .jsonl/.json/.txt files under {list(inputs)}")
    return files


def iter_documents(
    files: Sequence[Path], *, json_key: str, skip_bad_lines: bool, stats: TokenizeStats
) -> Iterator[str]:
    """Documents of ``files``: each ``.txt`` whole, each JSONL line's ``json_key`` string.

    Blank JSONL lines are ignored. A malformed line (bad UTF-8 or JSON, not an object, the key
    missing or not a string) raises, or with ``skip_bad_lines`` is skipped and counted in
    ``stats.skipped_lines``.

    Raises:
        ValueError: ``FILE:LINE: problem`` for a malformed line without ``skip_bad_lines``.
    """
    for path in files:
        if path.suffix == ".txt":
            yield path.read_bytes().decode("utf-8", errors="replace")
            continue
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                text, problem = _parse_jsonl_line(raw, json_key)
                if problem is None:
                    yield text
                elif skip_bad_lines:
                    stats.skipped_lines += 1
                else:
                    raise ValueError(
                        f"{path}:{line_number}: {problem}; fix the line or pass --skip-bad-lines to skip it"
                    )


def _parse_jsonl_line(raw: bytes, json_key: str) -> tuple[str, Optional[str]]:
    """(text, None), or ("", what is wrong with the line)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return "", f"not valid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return "", f"malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return "", f"expected a JSON object, got {type(record).__name__}"
    if json_key not in record:
        return "", f"no {json_key!r} field (fields: {sorted(record)[:8]}); choose one with --json-key"
    if not isinstance(record[json_key], str):
        return "", f"field {json_key!r} is a {type(record[json_key]).__name__}, not a string"
    try:
        record[json_key].encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800": valid JSON, not text
        return "", f"field {json_key!r} holds an unpaired surrogate {e.object[e.start]!r} at character {e.start}"
    return record[json_key], None


def preprocess_files(
    inputs: Sequence[str], *, tokenizer_path: str, output_prefix: str, json_key: str = "text",
    append_eod: bool = False, skip_bad_lines: bool = False, progress: bool = True,
) -> TokenizeStats:
    """Megatron's preprocess_data: tokenize JSONL/text ``inputs`` into ``OUTPUT_PREFIX.bin/.idx``.

    Raises:
        ValueError: for bad inputs (see ``expand_inputs``, ``iter_documents``), a bad tokenizer, or no
            documents at all; nothing is written then (an existing output is left as it was).
    """
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    stats = TokenizeStats()
    documents = iter_documents(files, json_key=json_key, skip_bad_lines=skip_bad_lines, stats=stats)
    written = tokenize_to_indexed(
        documents, tokenizer=tokenizer, output_prefix=output_prefix, append_eod=append_eod,
        progress=progress, total_bytes=sum(f.stat().st_size for f in files),
    )
    written.skipped_lines = stats.skipped_lines
    return written
