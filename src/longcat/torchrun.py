"""``longcat-torchrun``: torchrun, except that a Ctrl-C (SIGINT) or SIGTERM the workers answered with a
checkpoint ends the job with exit code 0.

torchrun forwards SIGINT / SIGTERM to its workers, waits for them, then raises its ``SignalException``
and exits 1 with a traceback, whatever the workers did. A longcat worker stops at a step boundary,
writes a checkpoint and exits 0 (``train.preempt_timeout_s``); for a scheduler or a person at a terminal
that is a clean stop, so this launcher reports it as one. It runs torchrun's own ``run`` with the same
arguments (``longcat-torchrun --help`` is torchrun's help), and each worker records its exit code in a
folder the launcher gives it (``LONGCAT_EXIT_DIR``, written by ``python -m longcat.train``). After the
signal: every local worker recorded 0 -> exit 0 and one line saying so; otherwise (a worker killed,
failed or still writing when torchrun gave up on it) -> 128 + the signal number, as a shell reports a
process a signal ended.

    longcat-torchrun --nproc-per-node 2 -m longcat.train recipe=pretrain parallel=ep2

Everything else is torchrun's: worker failures end with its error summary and exit 1.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

EXIT_DIR_ENV = "LONGCAT_EXIT_DIR"

__all__ = ["EXIT_DIR_ENV", "main", "record_exit_code"]


def record_exit_code(code: int) -> None:
    """In a worker launched by ``longcat-torchrun``: write ``code`` (and ``LOCAL_WORLD_SIZE``) to
    ``$LONGCAT_EXIT_DIR/rank<RANK>.exit``; a no-op elsewhere (no ``LONGCAT_EXIT_DIR``)."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    try:
        Path(folder, f"rank{rank}.exit").write_text(f"{code} {os.environ.get('LOCAL_WORLD_SIZE', '1')}\n")
    except OSError:  # the launcher's folder is gone (the launcher itself died): nothing to report to
        pass


def _local_exit_codes(folder: Path) -> tuple[list[int], int]:
    """(the exit codes the local workers recorded, the local world size they name; 0 if none wrote)."""
    codes, expected = [], 0
    for path in sorted(folder.glob("rank*.exit")):
        try:
            code, local_world = path.read_text().split()
            codes.append(int(code))
            expected = int(local_world)
        except ValueError:
            codes.append(-1)
    return codes, expected


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run torchrun with ``argv`` (default ``sys.argv[1:]``); returns the exit code (module doc)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="longcat-exit-") as folder:
        os.environ[EXIT_DIR_ENV] = folder  # the workers inherit the agent's environment
        try:
            run(args)
            return 0
        except ChildFailedError as exc:
            print(exc.format_msg(), file=sys.stderr, flush=True)
            return 1
        except SignalException as exc:
            name = signal.Signals(exc.sigval).name
            codes, expected = _local_exit_codes(Path(folder))
            if codes and len(codes) == expected and all(c == 0 for c in codes):
                print(f"longcat-torchrun: stopped by {name}: all {expected} local worker(s) checkpointed and "
                      "exited 0", file=sys.stderr, flush=True)
                return 0
            print(f"longcat-torchrun: stopped by {name}; local workers' exit codes {codes} (of {expected or '?'} "
                  "expected): not every worker stopped cleanly", file=sys.stderr, flush=True)
            return 128 + int(exc.sigval)


if __name__ == "__main__":
    sys.exit(main())
