#!/usr/bin/env python
"""Validate and render chat JSONL for SFT in the LongCat-Flash chat format; report counts.

Each input line is a ``messages`` or ShareGPT ``conversations`` record (see longcat.data.chat). Every
conversation is validated and rendered, and written as one JSON line
``{"source": FILE:LINE, "text", "input_ids", "loss_mask"}`` (loss_mask: 0/1 per token) for
inspection. ``--output`` ending in ``.jsonl`` names that file; anything else is a directory that
receives ``rendered.jsonl``, ``stats.json`` and the ``tokenizer.json`` used.

Examples:
    python tools/prepare_sft.py --input builtin --tokenizer .cache/longcat/stdlib/tokenizer.json \\
        --add-chat-tokens --output data/sft --seq-length 512
    python tools/prepare_sft.py --input chats.jsonl --tokenizer tok.json --output rendered.jsonl --skip-bad-lines

``--input builtin`` renders the embedded agentic set (longcat.data.agentic_samples; its tool results come
from really running the tools, see tools/make_agentic_sft.py).
Exit status 1 with ``error: FILE:LINE: problem`` on the first bad line unless --skip-bad-lines; 2 for bad
arguments or an output that cannot be written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from longcat.atomic_files import atomic_open, write_text_atomic
from longcat.data.agentic_samples import default_sft_records
from longcat.data.chat import has_chat_special_tokens, render_conversation, with_chat_special_tokens
from longcat.data.sft import load_conversations
from longcat.data.tokenizer import load_tokenizer
from longcat.tool_args import positive_int


class _CannotWrite(Exception):
    """The output could not be written (an OSError while creating or writing it)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="chat .jsonl file, or 'builtin' for the embedded agentic set")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (needs <|endoftext|> and <|pad|>)")
    parser.add_argument(
        "--output", required=True, help="OUT.jsonl, or a directory (rendered.jsonl, stats.json, tokenizer.json)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) bad lines instead of failing")
    parser.add_argument(
        "--add-chat-tokens", action="store_true",
        help="add </longcat_s>, <longcat_tool_call> etc. as special tokens before rendering (a directory output "
        "saves the tokenizer)",
    )
    parser.add_argument(
        "--seq-length", type=positive_int, default=None,
        help="also count conversations longer than SEQ_LENGTH + 1 tokens")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> dict:
    """Render ``args.input`` to ``args.output``; return the counts.

    Raises:
        ValueError: for bad input.
        _CannotWrite: when the output cannot be written; no temporary file is left behind.
    """
    tokenizer = load_tokenizer(args.tokenizer)
    if args.add_chat_tokens:
        tokenizer = with_chat_special_tokens(tokenizer)
    source = default_sft_records() if args.input == "builtin" else args.input
    loaded = load_conversations(source, skip_bad_lines=args.skip_bad_lines)
    if not loaded.conversations:
        raise ValueError(f"{args.input} holds no conversations ({loaded.num_skipped_lines} bad lines skipped)")
    to_file = args.output.endswith(".jsonl")
    directory = os.path.dirname(os.path.abspath(args.output)) if to_file else args.output
    out_path = args.output if to_file else os.path.join(directory, "rendered.jsonl")
    try:
        with atomic_open(out_path) as f:
            stats = _render(loaded, tokenizer=tokenizer, seq_length=args.seq_length, out=f)
        if not to_file:
            tokenizer.save(os.path.join(directory, "tokenizer.json"))
            write_text_atomic(os.path.join(directory, "stats.json"), json.dumps(stats, indent=2, sort_keys=True))
    except OSError as e:
        raise _CannotWrite(f"cannot write {args.output}: {e.strerror or e}") from e
    return stats


def _render(loaded, *, tokenizer, seq_length: int | None, out) -> dict:
    """Write one rendered JSON row per conversation of ``loaded`` to the file ``out``; return the counts."""
    stats = {"num_conversations": 0, "num_skipped_lines": loaded.num_skipped_lines, "num_tokens": 0,
             "num_loss_tokens": 0, "max_tokens": 0, "num_longer_than_seq_length": 0,
             "chat_special_tokens": has_chat_special_tokens(tokenizer), "vocab_size": tokenizer.vocab_size}
    for conv in loaded.conversations:
        rendered = render_conversation(conv, tokenizer=tokenizer)
        row = {"source": conv.source, "text": rendered.text, "input_ids": rendered.input_ids.tolist(),
               "loss_mask": rendered.loss_mask.astype(int).tolist()}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        num_tokens = len(rendered.input_ids)
        stats["num_conversations"] += 1
        stats["num_tokens"] += num_tokens
        stats["num_loss_tokens"] += int(rendered.loss_mask.sum())
        stats["max_tokens"] = max(stats["max_tokens"], num_tokens)
        stats["num_longer_than_seq_length"] += bool(seq_length and num_tokens > seq_length + 1)
    return stats


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stats = prepare(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except _CannotWrite as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: {stats['num_conversations']} conversations, {stats['num_tokens']} tokens "
        f"({stats['num_loss_tokens']} with loss), longest {stats['max_tokens']}; skipped "
        f"{stats['num_skipped_lines']} bad lines"
        + (f"; {stats['num_longer_than_seq_length']} longer than seq_length + 1" if args.seq_length else ""),
        file=sys.stderr,
    )
    if not stats["chat_special_tokens"]:
        print("warning: the tokenizer lacks the chat special tokens; pass --add-chat-tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
