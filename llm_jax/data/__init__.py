"""Input pipelines. Every source yields the same batch: dicts of numpy arrays

  inputs, targets, segment_ids, positions: int32 [global_batch_size // process_count, seq_len]
  loss_mask: float32, same shape (1 where the target counts in the loss)

plus what a source adds for its objective (preference sources: ref_logps with config.dpo.precompute_ref),

and batch k is a pure function of (config.data.seed, k), so resume is exact and independent of the number of
processes. Sources are imported lazily: the synthetic source needs no TensorFlow, the text sources do.
"""

from __future__ import annotations

import importlib
from typing import Iterator

import numpy as np
from llm_jax.errors import ConfigError

# source name -> module implementing `make_iterator(config, split, start_step, process_index, process_count,
# workdir)` and `prepare(config, workdir)`.
_SOURCES = {
    'synthetic': 'llm_jax.data.synthetic',
    'stdlib': 'llm_jax.data.pipeline',
    'text_files': 'llm_jax.data.pipeline',
    'tfds': 'llm_jax.data.pipeline',
    'hf_datasets': 'llm_jax.data.pipeline',
    'mixture': 'llm_jax.data.mixture',
    'sft_jsonl': 'llm_jax.data.sft',
    'preference_jsonl': 'llm_jax.data.preference',
    'preference_hf': 'llm_jax.data.preference',
    'preference_stdlib': 'llm_jax.data.preference',
}

Batch = dict[str, np.ndarray]


def _source_module(config):
  name = config.data.source
  if name not in _SOURCES:
    raise ConfigError(f'config.data.source: unknown source {name!r}; expected one of {", ".join(_SOURCES)}')
  return importlib.import_module(_SOURCES[name])


def prepare(config, workdir: str | None = None) -> None:
  """Makes sure the source's prepared data (tokenizer, token shards) exists; a no-op for synthetic data."""
  _source_module(config).prepare(config, workdir)


def make_iterator(config, split: str = 'train', start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, workdir: str | None = None) -> Iterator[Batch]:
  """Batches start_step, start_step+1, ... of `split`, this process's slice of each global batch."""
  if config.data.global_batch_size % process_count:
    raise ConfigError(f'config.data.global_batch_size: {config.data.global_batch_size} is not divisible by '
                     f'the {process_count} processes')
  return _source_module(config).make_iterator(config, split, start_step, process_index, process_count, workdir)
