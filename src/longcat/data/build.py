"""From a ``DataConfig`` to this rank's train loader and validation batches."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any, Union

import torch

from longcat.config.schema import DataConfig
from longcat.data.agentic_samples import default_sft_records
from longcat.data.blend import BlendedDataset
from longcat.data.corpus import CorpusPaths, prepare_stdlib_corpus, stdlib_cache_dir
from longcat.data.indexed import IndexedDataset
from longcat.data.provenance import check_data_tokenizer, check_tokenizer_fits_model
from longcat.data.sampler import MicroBatchLoader, collate
from longcat.data.samples import GPTDataset, Split, check_vocab
from longcat.data.sft import Overflow, Packing, SFTDataset
from longcat.data.stdlib_parts import is_stdlib_part, resolve_stdlib_part
from longcat.data.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from longcat.data.sft import SFTDataset

logger = logging.getLogger(__name__)

SampleDataset = Union[GPTDataset, BlendedDataset, "SFTDataset"]


@dataclasses.dataclass
class PretrainData:
    """This dp rank's view of the pretraining data.

    Attributes:
        train: this rank's infinite micro-batch iterator; checkpoint ``train.state_dict()``.
        valid: the validation samples (epoch-cycling), the same on every rank.
        tokenizer_path: the tokenizer.json the data was tokenized with.
        eod_id, pad_id: its ``<|endoftext|>`` and ``<|pad|>`` ids.
        dp_rank, dp_size: this rank's position in the data-parallel group.
    """

    train: MicroBatchLoader
    valid: SampleDataset
    tokenizer_path: str
    eod_id: int
    pad_id: int
    dp_rank: int
    dp_size: int

    def valid_batches(self, num_batches: int, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's ``num_batches`` validation micro-batches of [B, S] tensors, identical every call.

        Sharded like training: micro-batch j of rank r holds valid samples
        ``[(j*dp + r)*B, (j*dp + r + 1)*B)``, so the dp ranks together evaluate
        ``num_batches * B * dp`` distinct samples (cycling if the split is smaller); average the
        loss over the dp group.
        """
        batches = []
        for j in range(num_batches):
            start = (j * self.dp_size + self.dp_rank) * micro_batch_size
            batches.append(collate([self.valid[i] for i in range(start, start + micro_batch_size)]))
        return batches


def build_pretrain_data(
    cfg: DataConfig, *, vocab_size: int, dp_rank: int, dp_size: int, progress: bool = True
) -> PretrainData:
    """Prepare or load the corpus named by ``cfg`` and return this rank's data.

    ``corpus="stdlib"``: the stdlib corpus, tokenized with a BPE of ``vocab_size`` ids trained on it
    (or with ``cfg.tokenizer`` when set), cached under ``cfg.cache_dir`` (see
    ``prepare_stdlib_corpus``; concurrent ranks wait on a file lock while the first builds it).
    ``corpus="files"``: ``cfg.sources`` prefixes tokenized by ``cfg.tokenizer``, blended by weight.

    Args:
        cfg: the data section of the run config; validated here for ``dp_size`` and ``vocab_size``.
        vocab_size: the model's vocabulary size; every token id must be below it.
        dp_rank, dp_size: this rank's position in the data-parallel group.
        progress: tqdm bars on stderr while a corpus is prepared.

    Raises:
        ValueError: for an invalid config, a missing tokenizer for ``files``, a bad or empty
            dataset, or token ids >= vocab_size (each naming the file and the fix).
    """
    cfg.validate(dp=dp_size, vocab_size=vocab_size)
    if cfg.corpus == "sft":
        return _build_sft_data(cfg, vocab_size=vocab_size, dp_rank=dp_rank, dp_size=dp_size, progress=progress)
    if cfg.corpus == "stdlib" and cfg.sources:
        # A stage mixture of stdlib parts (and/or other prefixes tokenized with the stdlib tokenizer).
        corpus_prefixes, _, tokenizer_path = _stdlib_sources(cfg, vocab_size=vocab_size, progress=progress)
        corpus = CorpusPaths(corpus_prefixes[0], tokenizer_path)
        fields = [_source_fields(s) for s in cfg.sources]
        prefixes = [resolve_stdlib_part(p, corpus=corpus, max_bytes=cfg.corpus_max_bytes, progress=progress)
                    if is_stdlib_part(p) else p for p, _ in fields]
        weights = [w for _, w in fields]
    elif cfg.corpus == "stdlib":
        prefixes, weights, tokenizer_path = _stdlib_sources(cfg, vocab_size=vocab_size, progress=progress)
    else:  # files: DataConfig.validate made sure data.tokenizer is set
        tokenizer_path = cfg.tokenizer
        fields = [_source_fields(s) for s in cfg.sources]
        prefixes = [p for p, _ in fields]
        weights = [w for _, w in fields]
    tokenizer = load_tokenizer(tokenizer_path)

    train, valid = [], []
    for k, prefix in enumerate(prefixes):
        indexed = IndexedDataset(prefix)
        max_token_id = check_vocab(indexed, vocab_size, eod_id=tokenizer.eod_id)
        check_data_tokenizer(indexed, tokenizer, max_token_id=max_token_id)
        train.append(GPTDataset(indexed, seq_length=cfg.seq_length, eod_id=tokenizer.eod_id, split=Split.TRAIN,
                                valid_fraction=cfg.valid_fraction, seed=cfg.seed + k))
        valid.append(GPTDataset(indexed, seq_length=cfg.seq_length, eod_id=tokenizer.eod_id, split=Split.VALID,
                                valid_fraction=cfg.valid_fraction, seed=cfg.seed + k))
        logger.info(
            "data %s: %d documents, %d tokens; %d train / %d valid samples of %d tokens",
            prefix, indexed.num_documents, indexed.num_tokens, len(train[-1]), len(valid[-1]), cfg.seq_length,
        )
    check_tokenizer_fits_model(tokenizer, vocab_size)
    train_ds = train[0] if len(train) == 1 else BlendedDataset(train, weights, seed=cfg.seed)
    valid_ds = valid[0] if len(valid) == 1 else BlendedDataset(valid, weights, seed=cfg.seed)
    loader = MicroBatchLoader(
        train_ds, micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed
    )
    return PretrainData(
        train=loader, valid=valid_ds, tokenizer_path=tokenizer_path, eod_id=tokenizer.eod_id,
        pad_id=tokenizer.pad_id, dp_rank=dp_rank, dp_size=dp_size,
    )


def _stdlib_sources(cfg: DataConfig, *, vocab_size: int, progress: bool) -> tuple[list[str], list[float], str]:
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer)  # a clear error for a missing or malformed file
        with open(cfg.tokenizer, "rb") as f:
            tag = hashlib.sha256(f.read()).hexdigest()[:12]
        suffix = f"-max{cfg.corpus_max_bytes}" if cfg.corpus_max_bytes else ""
        cache_dir = os.path.join(cfg.cache_dir, f"stdlib-tok{tag}{suffix}")
    else:  # DataConfig.validate made sure vocab_size >= MIN_STDLIB_VOCAB_SIZE
        cache_dir = stdlib_cache_dir(cfg.cache_dir, vocab_size=vocab_size, max_bytes=cfg.corpus_max_bytes)
    paths = prepare_stdlib_corpus(
        cache_dir, vocab_size=vocab_size, max_bytes=cfg.corpus_max_bytes, tokenizer_path=cfg.tokenizer,
        progress=progress,
    )
    return [paths.prefix], [1.0], paths.tokenizer_path


def _source_fields(source: Any) -> tuple[str, float]:
    """(path, weight) of a ``DataSource``, a dict, or an OmegaConf node from YAML."""
    path = source["path"] if isinstance(source, dict) else getattr(source, "path", None)
    weight = source.get("weight", 1.0) if isinstance(source, dict) else getattr(source, "weight", 1.0)
    if not path or path == "???":
        raise ValueError(f"data.sources entry {source!r} has no path; give {{path: PREFIX, weight: W}}")
    return str(path), float(weight)


def _build_sft_data(cfg: DataConfig, *, vocab_size: int, dp_rank: int, dp_size: int, progress: bool) -> PretrainData:
    """Agentic SFT conversations rendered with the LongCat-Flash chat format (loss on assistant tokens)."""
    if cfg.tokenizer:
        tokenizer_path = cfg.tokenizer
    else:
        _, _, tokenizer_path = _stdlib_sources(cfg, vocab_size=vocab_size, progress=progress)
    tokenizer = load_tokenizer(tokenizer_path)
    check_tokenizer_fits_model(tokenizer, vocab_size)
    source = default_sft_records() if cfg.sft_path == "builtin" else cfg.sft_path
    packing, overflow = Packing(cfg.sft_packing), Overflow(cfg.sft_overflow)
    train_ds = SFTDataset(source, tokenizer=tokenizer, seq_length=cfg.seq_length, seed=cfg.seed, split=Split.TRAIN,
                          valid_fraction=cfg.valid_fraction, packing=packing, overflow=overflow,
                          skip_bad_lines=cfg.sft_skip_bad_lines)
    valid_ds = SFTDataset(source, tokenizer=tokenizer, seq_length=cfg.seq_length, seed=cfg.seed, split=Split.VALID,
                          valid_fraction=cfg.valid_fraction, packing=packing, overflow=overflow,
                          skip_bad_lines=cfg.sft_skip_bad_lines)
    logger.info("sft data %s: %d train / %d valid samples of %d tokens", cfg.sft_path, len(train_ds),
                len(valid_ds), cfg.seq_length)
    loader = MicroBatchLoader(train_ds, micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                              seed=cfg.seed)
    return PretrainData(train=loader, valid=valid_ds, tokenizer_path=tokenizer_path, eod_id=tokenizer.eod_id,
                        pad_id=tokenizer.pad_id, dp_rank=dp_rank, dp_size=dp_size)
