"""Megatron-compatible pretraining data: ``.bin/.idx`` files, packed GPT samples, blends, loaders.

Layers, bottom up:
    indexed    Megatron's PREFIX.bin/.idx format (reader over np.memmap, atomic writer)
    tokenizer  tokenizer.json wrapper with eod_id / pad_id
    corpus     the embedded stdlib corpus and JSONL/text preprocessing (tools/*.py call these)
    samples    GPTDataset: documents + EOD packed into seq_length + 1 windows, seeded split/shuffle
    blend      BlendedDataset: Megatron's weighted interleaving
    sampler    MicroBatchLoader: resumable, dp-sharded micro-batches
    build      build_pretrain_data: DataConfig -> this rank's PretrainData
"""

from longcat.data.blend import BlendedDataset
from longcat.data.build import PretrainData, build_pretrain_data
from longcat.data.corpus import CorpusPaths, prepare_stdlib_corpus, preprocess_files
from longcat.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    optimal_dtype,
    write_indexed_dataset,
)
from longcat.data.sampler import MicroBatchLoader
from longcat.data.samples import GPTDataset, Split, check_vocab
from longcat.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "BlendedDataset", "CorpusPaths", "GPTDataset", "IndexedDataset", "IndexedDatasetWriter",
    "MicroBatchLoader", "PretrainData", "Split", "TextTokenizer", "build_pretrain_data", "check_vocab",
    "load_tokenizer", "optimal_dtype", "prepare_stdlib_corpus", "preprocess_files", "write_indexed_dataset",
]
