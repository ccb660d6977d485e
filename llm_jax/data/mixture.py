"""Weighted mixtures of prepared directories (config.data.source='mixture', config.data.mixture='DIR:W,DIR:W').

Each DIR is the output of a preparation (its index.json, tokenizer.model and shards); all must share one
tokenizer. Rows of the global batch stream are given to the sources in blocks of BLOCK_ROWS rows: source i gets
q_i rows of each block (the weights' shares of BLOCK_ROWS, rounded by largest remainder), placed by a permutation
drawn from (seed, block). Row g of the stream (g = k * global_batch_size + r) is therefore a pure function of
(seed, g): its block b = g // BLOCK_ROWS and place o = g % BLOCK_ROWS give the source i and its rank j among
that source's rows of the block, and it reads row b * q_i + j of source i's own rows (the epoch orders of a single
split under a split id of its own, and its packing, config.data.packing). So batch k is a pure function of (seed, k)
and of the process slice, resume is exact, and the shares are exact per block (within 1/BLOCK_ROWS of the weights).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from llm_jax import storage
from llm_jax.errors import ConfigError
from llm_jax.data import pipeline
from llm_jax.data import preparation
from llm_jax.data import tokenizer as tokenizer_lib

BLOCK_ROWS = 4096
_SPLIT_IDS = pipeline._SPLIT_IDS  # pylint: disable=protected-access  # the ids of single splits


class MixtureError(ConfigError):
  """config.data.mixture cannot be used; the message names the field and the entry."""


def parse(spec: str) -> list[tuple[str, float]]:
  """[(directory, weight)] of 'DIR:W,DIR:W'; weights are positive numbers (normalised later)."""
  entries = [e.strip() for e in spec.split(',') if e.strip()]
  if not entries:
    raise MixtureError("config.data.mixture: empty; give comma-separated PREPARED_DIR:WEIGHT, e.g. "
                       "'/data/web:0.7,/data/code:0.3'")
  parsed = []
  for entry in entries:
    directory, sep, weight = entry.rpartition(':')
    if not sep or not directory:
      raise MixtureError(f'config.data.mixture: {entry!r} is not PREPARED_DIR:WEIGHT')
    try:
      value = float(weight)
    except ValueError:
      value = float('nan')
    if not np.isfinite(value) or value <= 0:
      raise MixtureError(f'config.data.mixture: {entry!r}: the weight {weight!r} is not a positive number')
    parsed.append((os.path.expanduser(directory), value))
  return parsed


def quotas(weights: list[float], block: int = BLOCK_ROWS) -> np.ndarray:
  """Rows of each block per source: the weights' shares of `block`, rounded by largest remainder."""
  shares = np.asarray(weights, np.float64) / np.sum(weights) * block
  counts = np.floor(shares).astype(np.int64)
  remainders = shares - counts
  for i in np.argsort(-remainders, kind='stable')[:block - counts.sum()]:
    counts[i] += 1
  return counts


def _load(config) -> list[tuple[str, float, dict]]:
  """(directory, weight, index) of each source, after checking that they share one tokenizer."""
  sources = []
  for directory, weight in parse(config.data.mixture):
    try:
      index = preparation.load_index(directory)
    except preparation.PrepareError as e:
      raise MixtureError(f'config.data.mixture: {directory}: not a prepared directory ({e})') from None
    sources.append((directory, weight, index))
  first_dir, _, first = sources[0]
  for directory, _, index in sources[1:]:
    if index['tokenizer']['fingerprint'] != first['tokenizer']['fingerprint']:
      raise MixtureError(f'config.data.mixture: {directory} was prepared with another tokenizer than {first_dir} '
                         f'(fingerprints {index["tokenizer"]["fingerprint"][:12]} vs '
                         f'{first["tokenizer"]["fingerprint"][:12]}); prepare both with the same '
                         f'config.data.tokenizer_path')
  return sources


def prepare(config, workdir: str | None = None) -> None:
  """Checks the sources and binds their tokenizer to the workdir (the sources are prepared beforehand)."""
  sources = _load(config)
  if workdir:
    directory, _, index = sources[0]
    tokenizer_lib.bind_to_workdir(storage.join(directory, index['tokenizer']['file']), workdir)


class Mixture(pipeline.Rows):
  """Rows of a mixture of prepared splits (pipeline.PackedSplit or DocumentSplit) as a pure function of (seed, row
  number): see the module docstring."""

  def __init__(self, parts: list, weights: list[float], seed: int, split_id: int,
               global_batch_size: int, seq_len: int, eos_id: int):
    self.parts, self.seed, self.split_id = parts, seed, split_id
    self.global_batch_size, self.seq_len, self.eos_id = global_batch_size, seq_len, eos_id
    self.quotas = quotas(weights)
    self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  def block(self, number: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each place, rank of the place among its source's places) of block `number`."""
    with self._lock:
      if number not in self._blocks:
        if len(self._blocks) >= 4:
          self._blocks.pop(min(self._blocks))
        rng = np.random.default_rng([self.seed, self.split_id, 7, number])
        source = rng.permutation(np.repeat(np.arange(len(self.parts)), self.quotas))
        rank = np.empty(BLOCK_ROWS, np.int64)
        for i in range(len(self.parts)):
          where = np.flatnonzero(source == i)
          rank[where] = np.arange(where.size)
        self._blocks[number] = (source, rank)
      return self._blocks[number]

  def sources_at(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, row number among that source's rows) of each global row number."""
    blocks, places = np.divmod(rows, BLOCK_ROWS)
    source, position = np.empty(rows.size, np.int64), np.empty(rows.size, np.int64)
    for number in np.unique(blocks):
      where = blocks == number
      block_source, block_rank = self.block(int(number))
      source[where] = block_source[places[where]]
      position[where] = number * self.quotas[source[where]] + block_rank[places[where]]
    return source, position

  def rows_at(self, numbers: np.ndarray) -> pipeline.Batch:
    source, position = self.sources_at(numbers)
    batch = {}
    for i, part in enumerate(self.parts):
      rows = np.flatnonzero(source == i)
      if rows.size:
        for key, values in part.rows_at(position[rows]).items():
          batch.setdefault(key, np.empty((numbers.size, self.seq_len), values.dtype))[rows] = values
    batch['source'] = source.astype(np.int32)  # which source each row came from (dropped by the iterator)
    return batch


def open_mixture(config, split: str = 'train', workdir: str | None = None) -> Mixture:
  """The mixture of the sources' `split` splits, after checking the config and the workdir's tokenizer."""
  role = pipeline._role(config, split)  # pylint: disable=protected-access
  pipeline.check_seq_len(config)
  sources = _load(config)
  directory, _, index = sources[0]
  tokenizer = tokenizer_lib.load(storage.join(directory, index['tokenizer']['file']))
  tokenizer_lib.check_vocab(config, tokenizer)
  if workdir:
    tokenizer_lib.check_workdir(workdir, tokenizer)
  parts = []
  for number, (directory, _, index) in enumerate(sources):
    stream = pipeline.TokenStream(preparation.read_split_tokens(directory, index, role))
    # A split id of its own per source, so that two sources of the same size do not share window orders.
    parts.append(pipeline.open_rows(config, stream, _SPLIT_IDS[role] + 2 * (number + 1),
                                    index['tokenizer']['eos_id'], f'{role} split of {directory}'))
  return Mixture(parts, [w for _, w, _ in sources], config.data.seed, _SPLIT_IDS[role],
                 config.data.global_batch_size, config.data.seq_len, index['tokenizer']['eos_id'])


def make_iterator(config, split: str = 'train', start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, workdir: str | None = None):
  return pipeline.batch_iterator(open_mixture(config, split, workdir), config, start_step, process_index,
                                 process_count)
