#!/usr/bin/env python
"""Prepare the embedded default corpus: the interpreter's stdlib sources, BPE-tokenized, cached.

Writes CACHE_DIR/{tokenizer.json, stdlib.bin, stdlib.idx, manifest.json}; a second run with the same
inputs finds the manifest and returns at once. Example:
    python tools/prepare_corpus.py --cache-dir .cache/longcat/stdlib --vocab-size 8192

The logic lives in ``longcat.data.corpus.prepare_stdlib_corpus``; this is only its command line.
"""

from __future__ import annotations

import argparse
import sys
import time

from longcat.data.corpus import DEFAULT_STDLIB_CACHE_DIR, prepare_stdlib_corpus


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=DEFAULT_STDLIB_CACHE_DIR, help=f"default: {DEFAULT_STDLIB_CACHE_DIR}")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    parser.add_argument("--max-bytes", type=int, default=0, help="cap on source bytes; 0 = whole stdlib")
    parser.add_argument("--tokenizer", default="", help="use this tokenizer.json instead of training one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start_s = time.perf_counter()
    try:
        paths = prepare_stdlib_corpus(
            args.cache_dir, vocab_size=args.vocab_size, max_bytes=args.max_bytes, tokenizer_path=args.tokenizer,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"prefix={paths.prefix} tokenizer={paths.tokenizer_path} ({time.perf_counter() - start_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
