#!/usr/bin/env python
"""Generate the agentic SFT set: multi-turn tool-use dialogues whose tools really run on this machine.

The tools (longcat.data.agentic_tools) search and read the default corpus's files (this
interpreter's stdlib sources), evaluate arithmetic and do date arithmetic; every tool message in the
output is what the tool returned here, and every answer is computed from those results. The
templates are listed in longcat.data.agentic_samples. The output is ``messages`` JSONL, one
conversation per line, written atomically; the same seed on the same machine gives the same file.
With the defaults it is the embedded set that ``data.sft_path=builtin`` trains on.

Examples:
    python tools/make_agentic_sft.py --output data/agentic.jsonl
    python tools/make_agentic_sft.py --output data/agentic_500.jsonl --num-conversations 500 --seed 7
    longcat-train recipe=sft data.sft_path=data/agentic_500.jsonl
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

from longcat.data.agentic_samples import (
    DEFAULT_NUM_CONVERSATIONS,
    DEFAULT_SEED,
    GeneratedConversation,
    generate_conversations,
    write_jsonl,
)
from longcat.tool_args import positive_int


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the .jsonl file to write (its directory is created)")
    parser.add_argument("--num-conversations", type=positive_int, default=DEFAULT_NUM_CONVERSATIONS,
                        help=f"conversations to generate (default {DEFAULT_NUM_CONVERSATIONS}); the templates are "
                        "taken in turn, as equal as the count allows (fewer than the number of templates uses "
                        "only the first ones)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seeds every choice; the same seed gives the same file (default {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    if not os.path.basename(args.output):
        parser.error(f"argument --output: must name a file, got {args.output!r}")
    if os.path.isdir(args.output):
        parser.error(f"argument --output: {args.output} is a directory; name a file in it, e.g. "
                     f"{os.path.join(args.output, 'agentic.jsonl')}")
    return args


def summarize(generated: list[GeneratedConversation]) -> str:
    """Counts per template, tool calls (by tool), parallel and text-less calling turns, tool errors."""
    templates = collections.Counter(c.template for c in generated)
    calls, parallel_turns, silent_turns, errors = collections.Counter(), 0, 0, 0
    for conversation in generated:
        for message in conversation.record["messages"]:
            tool_calls = message.get("tool_calls") or []
            calls.update(call["function"]["name"] for call in tool_calls)
            parallel_turns += len(tool_calls) > 1
            silent_turns += bool(tool_calls) and not message["content"]
            errors += message["role"] == "tool" and message["content"].startswith("error:")
    lines = [f"{len(generated)} conversations, {sum(calls.values())} tool calls ({parallel_turns} turns with "
             f"parallel calls, {silent_turns} calling turns without text, {errors} tool errors)"]
    lines.append("templates: " + ", ".join(f"{name} {n}" for name, n in sorted(templates.items())))
    lines.append("tool calls: " + ", ".join(f"{name} {n}" for name, n in sorted(calls.items())))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        generated = generate_conversations(args.num_conversations, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        write_jsonl(args.output, records=[c.record for c in generated])
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {summarize(generated)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
