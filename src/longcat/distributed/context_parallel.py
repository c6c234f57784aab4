"""Context parallelism (CP): every cp rank holds S/cp tokens of every sequence, load-balanced for causal attention.

The split (as Llama 3's all-gather CP, arXiv 2407.21783 §3.3.2, and Megatron-core's CP): the sequence
is cut into 2*cp equal chunks of L = S/(2*cp) tokens and cp rank r holds chunks r and 2*cp-1-r, in
that order. Under a causal mask the work of a query grows with its position; pairing an early chunk
with its mirror gives every rank the same attention work (r+1 + 2cp-r = 2cp+1 chunk-blocks each).

    global chunks:    0   1   2   3   4   5   6   7          (cp = 4, 2*cp = 8 chunks of L tokens)
    cp rank 0:        0                           7
    cp rank 1:            1                   6
    cp rank 2:                2           5
    cp rank 3:                    3   4

Everything here is model-agnostic except ``apply_context_parallel``, the plan for LongCat-Flash. The
MLA side (all-gather of the compressed latent + rope key, attention of the local queries against the
gathered keys) is ``MultiHeadLatentAttention._forward_context_parallel`` in ``longcat.model.attention``;
the choice of that exchange over expanded K/V or a ring is argued there and measured in
``longcat.bench.context_parallel``.

What the caller (the trainer) does under CP, per micro-batch, on every rank of a cp group:
    1. Compute everything that shifts along S on the *global* sequence first (labels, MTP labels
       ``mtp_labels(labels)``), then ``cp_split`` each [B, S, ...] tensor (ids, labels, MTP labels,
       token mask, position ids if any) to this rank's [B, S/cp, ...].
    2. Run the model on the local tokens. ``LongcatFlashForCausalLM`` after ``apply_context_parallel``
       takes position_ids None as "the local tokens' global positions" (``cp_local_positions``) and
       forms the MTP head's next-token input on the global sequence (``cp_next_token_ids``).
    3. Sum the token losses over the local tokens; the global token counts the loss is normalised by
       must be summed over cp as they are over dp. Router statistics (``MoEStats``) are local: sum
       ``expert_counts_E`` / ``prob_sum_E`` / ``num_tokens`` over cp before the expert-bias update
       (Eq. 2) and before any loss that is not a sum over tokens (the load-balance loss, Eq. 3-5).
    4. After backward, all-reduce (sum) every parameter's grad over cp: each cp rank's grads are
       partial sums over its tokens (dense params: over dp x cp together; experts: as under dp).

Shape legend:
    B   batch (micro-batch rows)
    S   global sequence length (tokens of one sequence over the whole cp group)
    N   S / cp local tokens on one cp rank
    L   S / (2 * cp) tokens per chunk
    G   size of the cp group (= cp)
    *   any trailing dims (carried along)
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.distributed as dist

from longcat.distributed.collectives import all_gather_along

__all__ = [
    "check_cp_seq_len",
    "cp_all_gather_sequence",
    "cp_chunk_ids",
    "cp_local_positions",
    "cp_next_token_ids",
    "cp_reassemble",
    "cp_split",
    "cp_split_batch",
]


def check_cp_seq_len(seq_len: int, cp: int) -> None:
    """Raise unless a sequence of ``seq_len`` tokens can be split into 2*cp equal chunks.

    Raises:
        ValueError: cp < 1, or seq_len not a positive multiple of 2*cp (the message names S, cp and the fix).
    """
    if cp < 1:
        raise ValueError(f"context parallelism: cp={cp} must be >= 1")
    if seq_len <= 0 or seq_len % (2 * cp) != 0:
        lower = seq_len - seq_len % (2 * cp)
        upper = lower + 2 * cp
        suggestion = f"{upper}" if lower <= 0 else f"{lower} or {upper}"
        raise ValueError(
            f"context parallelism: sequence length S={seq_len} is not divisible by 2*cp={2 * cp} (cp={cp}); "
            f"each sequence is cut into 2*cp equal chunks for causal load balance: use S={suggestion} "
            f"(pad or pack the sequences to a multiple of {2 * cp}) or a cp that divides S/2"
        )


def _check_rank(cp_rank: int, cp: int) -> None:
    if not 0 <= cp_rank < cp:
        raise ValueError(f"context parallelism: cp_rank={cp_rank} is outside [0, cp={cp})")


def cp_chunk_ids(*, cp_rank: int, cp: int) -> tuple[int, int]:
    """The two global chunk indices (of 2*cp) held by ``cp_rank``: ``(cp_rank, 2*cp - 1 - cp_rank)``.

    Raises:
        ValueError: cp_rank outside [0, cp).
    """
    _check_rank(cp_rank, cp)
    return cp_rank, 2 * cp - 1 - cp_rank


def cp_local_positions(
    seq_len: int, *, cp_rank: int, cp: int, device: Optional[torch.device | str] = None
) -> torch.Tensor:
    """Global positions of this rank's local tokens, in local order: int64 [N] (N = S/cp).

    ``[r*L, ..., (r+1)*L - 1, (2cp-1-r)*L, ..., (2cp-r)*L - 1]`` with L = S/(2cp); ascending, so the
    local tokens keep their relative causal order. Use as RoPE positions of the local tokens.

    Raises:
        ValueError: see ``check_cp_seq_len``; cp_rank outside [0, cp).
    """
    check_cp_seq_len(seq_len, cp)
    low, high = cp_chunk_ids(cp_rank=cp_rank, cp=cp)
    L = seq_len // (2 * cp)
    chunk_L = torch.arange(L, device=device)
    return torch.cat([low * L + chunk_L, high * L + chunk_L])


def cp_split(x: torch.Tensor, *, cp_rank: int, cp: int, seq_dim: int = 1) -> torch.Tensor:
    """This rank's part of a global tensor: [B, S, *] -> [B, S/cp, *] (chunks r and 2cp-1-r, concatenated).

    Works for ids, labels, masks, position ids and activations alike (a copy; differentiable).

    Args:
        x: the global tensor, the same on every cp rank; ``x.shape[seq_dim]`` = S.
        cp_rank: this rank's index in the cp group.
        cp: the cp group size.
        seq_dim: the sequence dimension (negative allowed).

    Raises:
        ValueError: see ``check_cp_seq_len``; cp_rank outside [0, cp).
    """
    S = x.shape[seq_dim]
    check_cp_seq_len(S, cp)
    low, high = cp_chunk_ids(cp_rank=cp_rank, cp=cp)
    L = S // (2 * cp)
    return torch.cat([x.narrow(seq_dim, low * L, L), x.narrow(seq_dim, high * L, L)], dim=seq_dim)


def cp_split_batch(batch: Mapping[str, torch.Tensor], *, cp_rank: int, cp: int) -> dict[str, torch.Tensor]:
    """``cp_split`` of every tensor with 2 or more dims (taken as [B, S, ...], split along dim 1) of a
    micro-batch; 0-/1-dim tensors and other values are passed on unchanged.

    Shift labels (``mtp_labels``) on the global batch *before* splitting: a local chunk's last
    token's target lives in the next chunk, usually on another rank.
    """
    return {k: cp_split(v, cp_rank=cp_rank, cp=cp) if isinstance(v, torch.Tensor) and v.dim() >= 2 else v
            for k, v in batch.items()}


def cp_reassemble(gathered: torch.Tensor, *, cp: int, seq_dim: int = 1) -> torch.Tensor:
    """Inverse of ``cp_split`` after a rank-order gather: [B, cp*N, *] (rank 0's N, rank 1's N, ...) -> [B, S, *]
    in global order (differentiable: a reshape, a flip and a concatenation).

    Raises:
        ValueError: ``gathered.shape[seq_dim]`` not divisible by 2*cp.
    """
    S = gathered.shape[seq_dim]
    check_cp_seq_len(S, cp)
    if cp == 1:
        return gathered
    dim = seq_dim % gathered.dim()
    L = S // (2 * cp)
    # [B, S, *] -> [B, G, 2, L, *]: (rank g, slot 0) = chunk g, (rank g, slot 1) = chunk 2cp-1-g
    chunks = gathered.unflatten(dim, (cp, 2, L))
    low = chunks.select(dim + 1, 0)  # [B, G, L, *], chunks 0..cp-1
    high = chunks.select(dim + 1, 1).flip(dim)  # [B, G, L, *], chunks cp..2cp-1
    return torch.cat([low, high], dim=dim).flatten(dim, dim + 1)


def cp_all_gather_sequence(x_local: torch.Tensor, *, seq_dim: int = 1, cp_group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather this rank's [B, N, *] over the cp group and put it in global order: [B, S, *].

    Autograd-aware: the backward reduce-scatters the gradient (each rank's gathered copy was consumed
    by its own queries, so the local part's gradient is the sum over ranks), via ``all_gather_along``.
    A size-1 group returns ``x_local`` itself.
    """
    G = cp_group.size()
    if G == 1:
        return x_local
    # [B, N, *] local, chunks (r, 2cp-1-r) -> all_gather(cp, dim seq_dim) -> [B, G*N, *] rank order
    gathered = all_gather_along(x_local, dim=seq_dim, group=cp_group)
    return cp_reassemble(gathered, cp=G, seq_dim=seq_dim)


@torch.no_grad()
def cp_next_token_ids(input_ids_BN: torch.Tensor, *, cp_group: dist.ProcessGroup) -> torch.Tensor:
    """The local part of ``roll(global_ids, -1, dims=1)``: [B, N] -> [B, N], tok_{t+1} for each local t.

    The MTP head's input (``longcat.model.model.run_mtp``); the last global position wraps to tok_0
    as in the single-process model (its loss is masked). Costs one all-gather of the int ids.
    """
    G, r = cp_group.size(), cp_group.rank()
    if G == 1:
        return torch.roll(input_ids_BN, shifts=-1, dims=1)
    # [B, N] ids -> all_gather(cp, dim 1) -> [B, S] global order (no grad: integers)
    global_BS = cp_all_gather_sequence(input_ids_BN, seq_dim=1, cp_group=cp_group)
    return cp_split(torch.roll(global_BS, shifts=-1, dims=1), cp_rank=r, cp=G)
