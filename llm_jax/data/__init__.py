"""Input pipelines. Every source yields the same batch: dicts of numpy arrays

  inputs, targets, segment_ids, positions: int32 [global_batch_size // process_count, seq_len]
  loss_mask: float32, same shape (1 where the target counts in the loss)

plus what a source adds for its objective (preference sources: ref_chosen, ref_rejected with config.dpo.precompute_ref),

and batch k is a pure function of (config.data.seed, k), so resume is exact and independent of the number of
processes. Sources are imported lazily: the synthetic source needs no TensorFlow, the text sources do.
"""

from __future__ import annotations

import importlib
import re
from typing import Iterator

import numpy as np
from llm_jax.data import cleaning, pipeline, sft, tokenizer
from llm_jax.errors import ConfigError, check_choice, fail

# source name -> module implementing `make_iterator(config, split, start_step, process_index, process_count,
# workdir)` and `prepare(config, workdir)`.
SOURCES = {
    'synthetic': 'llm_jax.data.synthetic',
    'stdlib': 'llm_jax.data.pipeline',
    'text_files': 'llm_jax.data.pipeline',
    'tfds': 'llm_jax.data.pipeline',
    'hf_datasets': 'llm_jax.data.pipeline',
    'mixture': 'llm_jax.data.mixture',
    'sft_jsonl': 'llm_jax.data.sft',
    'sft_stdlib': 'llm_jax.data.sft',
    'preference_jsonl': 'llm_jax.data.preference',
    'preference_hf': 'llm_jax.data.preference',
    'preference_stdlib': 'llm_jax.data.preference',
    'prompts_jsonl': 'llm_jax.data.prompts',
    'prompts_hf': 'llm_jax.data.prompts',
}

PAIR_SOURCES = tuple(name for name, module in SOURCES.items() if module == 'llm_jax.data.preference')  # yield
# preference pairs (chosen, rejected), which the preference objectives train on
PROMPT_SOURCES = tuple(name for name, module in SOURCES.items() if module == 'llm_jax.data.prompts')  # yield
# prompts, which objectives that learn from rollouts (grpo) sample completions of

Batch = dict[str, np.ndarray]


def check_config(config) -> None:
  """config.data's fields (and their bounds by config.model.max_seq_len); ConfigError naming the first bad one.
  Checked before anything is read or prepared."""
  d = config.data
  check_choice('data.source', d.source, SOURCES)
  if d.source in PAIR_SOURCES:  # rows of pairs: positions restart for each sequence, so model.max_seq_len bounds
    if d.seq_len <= 0:  # one sequence (dpo.max_length, checked by preference.lengths), not the row
      fail('data.seq_len', f'must be positive, got {d.seq_len}')
  else:
    pipeline.check_seq_len(config)
  if not 0.0 < d.mask_prob < 1.0:
    fail('data.mask_prob', f'must be in (0, 1), got {d.mask_prob}')
  try:
    re.compile(d.document_separator, re.MULTILINE)
  except re.error as e:
    fail('data.document_separator', f'{d.document_separator!r} is not a regular expression ({e})')
  if d.filters != 'auto':
    for name in filter(None, (n.strip() for n in d.filters.split(','))):
      if name not in cleaning.FILTER_NAMES:
        fail('data.filters', f'unknown filter {name!r}; expected some of {", ".join(cleaning.FILTER_NAMES)} (or '
             f'auto, or \'\')')
  if not 0.0 < d.near_dedup_threshold <= 1.0:
    fail('data.near_dedup_threshold', f'must be in (0, 1], got {d.near_dedup_threshold}')
  try:
    tokenizer.parse_coverage(d.tokenizer_character_coverage)
  except tokenizer.TokenizerError as e:
    raise ConfigError(str(e)) from None
  if d.prepare_workers < 0:
    fail('data.prepare_workers', f'must be >= 0 (0 = the machine\'s cores), got {d.prepare_workers}')
  if not 0.0 < d.validation_fraction < 1.0:
    fail('data.validation_fraction', f'must be between 0 and 1, got {d.validation_fraction}')
  if d.source == 'hf_datasets' and not d.hf_path:
    fail('data.hf_path', 'empty; name a dataset (hub name, local folder, json/parquet/text loader or a '
         'save_to_disk folder)')
  if d.source == 'prompts_hf' and not d.hf_path:
    fail('data.hf_path', 'empty; name the dataset of prompts (and answers)')
  if d.prompt_columns:
    from llm_jax.data import prompts  # pylint: disable=g-import-not-at-top (source modules load lazily, as below)
    prompts.parse_columns(d.prompt_columns)
  if d.source == 'preference_hf' and not d.hf_path:
    fail('data.hf_path', 'empty; name the dataset of prompt/chosen/rejected rows')
  if d.preference_columns:
    from llm_jax.data import preference  # pylint: disable=g-import-not-at-top (source modules load lazily, as below)
    preference.parse_columns(d.preference_columns)
  if d.source == 'mixture':
    from llm_jax.data import mixture  # pylint: disable=g-import-not-at-top (source modules load lazily, as above)
    mixture.parse(d.mixture)
  check_choice('data.packing', d.packing, pipeline.PACKINGS)
  check_choice('data.sft_truncation', d.sft_truncation, sft.TRUNCATIONS)
  check_choice('data.add_bos', d.add_bos, tokenizer.ADD_BOS_SETTINGS)


def _source_module(config):
  name = config.data.source
  check_choice('data.source', name, SOURCES)
  return importlib.import_module(SOURCES[name])


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
