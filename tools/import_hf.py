#!/usr/bin/env python
"""Import a Hugging Face LongCat-Flash folder (config.json + safetensors, released per-expert or
transformers layout) as a longcat checkpoint folder; start a run from it with train.init_from=OUTPUT
(the run's model.* settings must match the imported config, printed below).

    python tools/import_hf.py --hf hf/longcat-tiny --output runs/imported/step_00000000
"""

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from longcat.interop import import_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, required=True, help="the Hugging Face model folder")
    parser.add_argument("--output", type=Path, required=True, help="the checkpoint folder to create")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = import_hf(args.hf, output=args.output, force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overrides = " ".join(f"model.{k}={v}" for k, v in asdict(result.config).items())
    print(f"{args.hf} ({result.layout.value}) -> {result.output} ({result.num_tensors} tensors)")
    print(f"model config: {overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
