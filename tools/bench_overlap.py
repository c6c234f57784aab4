"""ScMoE overlap benchmark: ep=2 on 2 processes over a shaped veth link (see README, "ScMoE overlap
benchmark", and ``longcat.bench.overlap``). Needs root (CAP_NET_ADMIN) for the network namespaces;
without it the link is emulated on loopback and the result says so.

    python tools/bench_overlap.py                    # writes benchmarks/results/overlap.json
    python tools/bench_overlap.py --rate-mbit 200 --rounds 7
"""

import sys

from longcat.bench.overlap import main

if __name__ == "__main__":
    sys.exit(main())
