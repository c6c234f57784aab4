"""Context-parallel MLA benchmark (see ``longcat.bench.context_parallel``): the bytes and extra
``kv_b_proj`` FLOPs of a latent all-gather, an expanded K/V all-gather and a K/V ring at LongCat-Flash's
dimensions (analytic), and one MLA block's forward + backward measured at cp=1 vs cp=2 (2 gloo processes).

    python tools/bench_context_parallel.py            # writes benchmarks/results/context_parallel.json
    python tools/bench_context_parallel.py --quick    # tiny settings: a smoke test
    python tools/bench_context_parallel.py --seq-len 2048 --rounds 5 --analytic-cp 4
"""

import sys

from longcat.bench.context_parallel import main

if __name__ == "__main__":
    sys.exit(main())
