#!/usr/bin/env python
"""Export a longcat checkpoint as a Hugging Face LongCat-Flash folder (config.json, safetensors shards
with model.safetensors.index.json, tokenizer files, generation_config.json), loadable with
transformers.AutoModelForCausalLM.from_pretrained(OUTPUT).

    python tools/export_hf.py --checkpoint runs/pretrain/checkpoints --output hf/longcat-tiny
"""

import argparse
import logging
import sys
from pathlib import Path

from longcat.interop import ExportDtype, ExportLayout, export_hf, parse_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a step_XXXXXXXX checkpoint folder, or a run's checkpoints/ (the latest complete one)")
    parser.add_argument("--output", type=Path, required=True, help="the folder to create")
    parser.add_argument("--dtype", choices=[d.value for d in ExportDtype], default=ExportDtype.fp32.value,
                        help="tensor dtype (default: %(default)s); the router stays fp32 either way")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json to include (default: the run's own, if it can be found)")
    parser.add_argument("--layout", choices=[layout.value for layout in ExportLayout],
                        default=ExportLayout.transformers.value,
                        help="transformers (default): the tensors the installed transformers saves and loads, "
                             "asked of it (5.25: exactly the released set); released: exactly the released "
                             "tensors (vLLM, SGLang), needs no transformers")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = export_hf(args.checkpoint, output=args.output, dtype=ExportDtype(args.dtype),
                           layout=ExportLayout(args.layout), tokenizer=args.tokenizer,
                           max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.checkpoint} -> {result.output} ({result.num_tensors} tensors in {len(result.shards)} "
          f"shard(s), {result.total_bytes / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
