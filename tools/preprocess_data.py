#!/usr/bin/env python
"""Tokenize JSONL or text files into a Megatron-LM ``PREFIX.bin/.idx`` indexed dataset.

Example:
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer .cache/longcat/stdlib/tokenizer.json \\
        --output-prefix data/corpus --append-eod

The logic lives in ``longcat.data.corpus.preprocess_files``; this is only its command line.
"""

from __future__ import annotations

import argparse
import sys

from longcat.data.corpus import preprocess_files


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", nargs="+", required=True,
        help=".jsonl/.json files (one JSON object per line), .txt files (one document per file), or "
        "directories of them (searched recursively, sorted)",
    )
    parser.add_argument("--json-key", default="text", help="JSONL field holding the document text (default: text)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (needs <|endoftext|> and <|pad|>)")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    parser.add_argument("--append-eod", action="store_true", help="append <|endoftext|> to every document")
    parser.add_argument(
        "--skip-bad-lines", action="store_true",
        help="skip (and count) malformed JSONL lines instead of failing on the first one",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stats = preprocess_files(
            args.input, tokenizer_path=args.tokenizer, output_prefix=args.output_prefix, json_key=args.json_key,
            append_eod=args.append_eod, skip_bad_lines=args.skip_bad_lines, progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output_prefix}.bin/.idx: {stats.num_documents} documents, {stats.num_tokens} tokens "
        f"from {stats.num_bytes} bytes; skipped {stats.skipped_lines} bad lines",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
