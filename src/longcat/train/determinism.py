"""Deterministic computation (arXiv 2509.01322 §5: every step re-runs to the same bits).

``enable_determinism()`` turns on PyTorch's deterministic mode and sets what it does not cover:
the cuBLAS workspace variable (needed for deterministic GEMMs on CUDA), one fixed NCCL algorithm
(NCCL may otherwise pick ring or tree per message size and topology, which changes the summation
order), TransformerEngine's deterministic kernels, inductor's deterministic mode (``train.compile``:
no kernel chosen by timing it on the device), no TF32, no cuDNN benchmarking. The model's own
reductions are already ordered: the MoE combine sums each token's K weighted copies in a fixed order
(no scatter-add of duplicate indices), all-reduces run in a fixed bucket order, and all-to-all splits
are deterministic.

Random streams are derived per (seed, rank, purpose) so that no two ranks or purposes draw the same
numbers: ``seeded_generator(seed, rank=r, purpose="dropout")``; ``seed_rank_streams`` reseeds the
process-wide streams (torch CPU and CUDA, ``random``, NumPy) per rank once the model is initialised
(initialisation itself must draw the same numbers on every rank). The data order needs no stream of
its own: every rank walks one seeded permutation and takes a disjoint slice (``data/sampler.py``),
in the main process (no loader workers).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

import torch

CUBLAS_WORKSPACE = ":4096:8"
# Set only where unset: a launcher's explicit choice wins.
DETERMINISTIC_ENV = {
    "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE,
    "NCCL_ALGO": "Ring",
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
    # inductor (train.compile): no on-device benchmarking that picks kernels by timing
    "TORCHINDUCTOR_DETERMINISTIC": "1",
}


def enable_determinism() -> None:
    """Make every kernel this process runs deterministic (or fail loudly where one is not).

    Must run before CUDA and NCCL are initialised for the environment variables to take effect
    (``launch.run_training`` calls it first). Idempotent.
    """
    for key, value in DETERMINISTIC_ENV.items():
        os.environ.setdefault(key, value)
    inductor_config = sys.modules.get("torch._inductor.config")  # it reads the variable when imported
    if inductor_config is not None and os.environ["TORCHINDUCTOR_DETERMINISTIC"] == "1":
        inductor_config.deterministic = True  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def is_deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def derive_seed(seed: int, *, rank: int, purpose: str) -> int:
    """A 63-bit seed unique to (seed, rank, purpose), stable across runs and Python versions."""
    digest = hashlib.sha256(f"{seed}/{rank}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, *, rank: int, purpose: str, device: str = "cpu") -> torch.Generator:
    """A generator seeded with ``derive_seed(seed, rank=rank, purpose=purpose)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, rank=rank, purpose=purpose))
    return gen


def seed_rank_streams(seed: int, *, rank: int) -> None:
    """Reseed the process-wide random streams (torch CPU and every CUDA device, ``random``, NumPy)
    from ``derive_seed(seed, rank=rank, purpose=...)``: distinct on every rank, the same on reruns."""
    import numpy as np

    torch.manual_seed(derive_seed(seed, rank=rank, purpose="torch"))
    random.seed(derive_seed(seed, rank=rank, purpose="python"))
    np.random.seed(derive_seed(seed, rank=rank, purpose="numpy") % 2**32)
