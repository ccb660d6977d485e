"""tf.data iterators of packed sequences over prepared token shards (stdlib, text_files, tfds, hf_datasets sources;
mixture.py mixes several prepared directories with the same machinery).

A split is one token stream `doc EOS doc EOS ...` (see prepare.py). It is cut into windows of seq_len+1 tokens
with stride seq_len: window w is stream[w*L : w*L + L + 1], so consecutive windows share one token and every
token but the first is a target exactly once per epoch. There are W = (num_tokens - 1) // L windows; the tail
shorter than a window is not used.

Order: epoch e visits the windows in the permutation `default_rng([seed, split_id, e]).permutation(W)`; the
epochs' orders are concatenated and global batch k is entries [k*B, (k+1)*B) of that sequence, B =
global_batch_size. Process p of P takes rows [p*B/P, (p+1)*B/P). So batch k is a pure function of (seed, k):
resuming at step k needs only k, and the global batch does not depend on the number of processes.

Packing: config.data.packing='stream' (here, `PackedSplit`) cuts rows as above; 'documents' (`DocumentSplit`,
document_packing.py) makes rows of whole documents instead, for long-context training. Within a stream window
(`pack_windows`): a document owns the EOS that ends it, so the token after an EOS starts a new segment.
Segment ids count documents from 1 within each row; positions restart at 0 at each document start (the partial
document at the start of a window starts at position 0 too: RoPE only sees relative positions). The loss mask is
1 where the target continues the input's document, i.e. everywhere except after an EOS: a document's EOS is
predicted by its last token, the first token of a document is not predicted (it would need attention across
documents). No padding is needed: every row is full.

Eval iterators are the same over the validation split; an evaluation starts them at step 0 each time.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import Iterator, Sequence

import numpy as np

from llm_jax import storage
from llm_jax.errors import ConfigError, fail
from llm_jax.data import document_packing
from llm_jax.data import preparation
from llm_jax.data import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]
_SPLIT_IDS = {'train': 0, 'validation': 1}  # so train and eval permutations differ for the same seed
_BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


def prepare(config, workdir=None):
  """`llm_jax.data.prepare` for the text sources: see preparation.py."""
  return preparation.prepare(config, workdir)


def pack_windows(tokens: np.ndarray, eos_id: int) -> Batch:
  """The batch of rows of seq_len+1 consecutive stream tokens, `tokens` [rows, seq_len+1]."""
  tokens = np.asarray(tokens)
  is_eos = tokens == eos_id
  # Segment of token j: 1 + number of EOS strictly before j (the EOS itself belongs to the document it ends).
  segments = (1 + np.cumsum(is_eos, axis=1) - is_eos).astype(np.int32)
  starts_document = np.ones_like(is_eos)
  starts_document[:, 1:] = is_eos[:, :-1]
  index = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  document_start = np.maximum.accumulate(np.where(starts_document, index, 0), axis=1)
  positions = index - document_start
  return {
      'inputs': tokens[:, :-1].astype(np.int32),
      'targets': tokens[:, 1:].astype(np.int32),
      'segment_ids': segments[:, :-1],
      'positions': positions[:, :-1].astype(np.int32),
      'loss_mask': (segments[:, 1:] == segments[:, :-1]).astype(np.float32),
  }


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> Batch:
  """Joins token lists as `doc EOS doc EOS ...` and packs the stream's windows, as the pipeline does (in stream
  order, without shuffling): for tests, e.g. that changing one document does not move another's logits."""
  stream = np.fromiter((t for doc in documents for t in (*doc, eos_id)), np.int64)
  num_windows = (stream.size - 1) // seq_len
  if num_windows < 1:
    raise ValueError(f'{stream.size} tokens do not fill one window of seq_len+1 = {seq_len + 1}')
  starts = np.arange(num_windows) * seq_len
  return pack_windows(stream[starts[:, None] + np.arange(seq_len + 1)], eos_id)


class TokenStream:
  """A split's token shards (memory-mapped, or `preparation.RangedShard`s in a bucket) addressed as one array."""

  def __init__(self, shards: list):
    self._shards = [s for s in shards if s.size]
    self._starts = np.cumsum([0] + [s.size for s in self._shards])
    self.num_tokens = int(self._starts[-1])
    self._ranged = any(isinstance(s, preparation.RangedShard) for s in self._shards)

  def _pieces(self, start: int, count: int):
    """(tokens before the piece, shard, offset in it, tokens) of stream[start : start + count], in order."""
    shard = int(np.searchsorted(self._starts, start, side='right')) - 1
    offset, filled = start - int(self._starts[shard]), 0
    while filled < count:
      take = min(count - filled, self._shards[shard].size - offset)
      yield filled, shard, offset, take
      filled += take
      shard, offset = shard + 1, 0

  def read_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
    """rows[i] = stream[starts[i] : starts[i] + length], int32 (see read_spans)."""
    rows = np.empty((len(starts), length), np.int32)
    self._read_spans_into(list(rows), starts)
    return rows

  def read_spans(self, starts, lengths) -> list[np.ndarray]:
    """[stream[s : s + n] for s, n in zip(starts, lengths)], int32. In a bucket: one concurrent batch of ranged
    requests for exactly these tokens (storage.read_ranges); memory holds the batch, never a shard."""
    spans = [np.empty(int(n), np.int32) for n in lengths]
    self._read_spans_into(spans, starts)
    return spans

  def _read_spans_into(self, outs: list[np.ndarray], starts) -> None:
    if not self._ranged:
      for out, start in zip(outs, starts):
        self.read_into(out, int(start))
      return
    pieces = [(out, *piece) for out, start in zip(outs, starts) for piece in self._pieces(int(start), out.size)]
    ranges = [(self._shards[shard].path, *self._shards[shard].byte_range(offset, offset + take))
              for _, _, shard, offset, take in pieces]
    data = storage.read_ranges(*map(list, zip(*ranges))) if ranges else []
    for (out, filled, shard, _, take), chunk in zip(pieces, data):
      out[filled:filled + take] = np.frombuffer(chunk, self._shards[shard].dtype)

  def read_into(self, out: np.ndarray, start: int) -> None:
    """out[:] = stream[start : start + len(out)]."""
    shard = int(np.searchsorted(self._starts, start, side='right')) - 1
    filled, offset = 0, start - int(self._starts[shard])
    while filled < out.size:
      part = self._shards[shard][offset:offset + out.size - filled]
      out[filled:filled + part.size] = part
      filled += part.size
      shard, offset = shard + 1, 0


class Rows:
  """A split's rows addressed by their global number: global batch k is rows [k*B, (k+1)*B), process p of P takes
  its B/P of them. Subclasses give `rows_at(numbers) -> Batch`."""

  global_batch_size: int

  def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
    """This process's slice of global batch `step`."""
    per_process = self.global_batch_size // process_count
    first = step * self.global_batch_size + process_index * per_process
    return self.rows_at(np.arange(first, first + per_process, dtype=np.int64))

  def rows_at(self, numbers: np.ndarray) -> Batch:
    raise NotImplementedError


class PackedSplit(Rows):
  """Rows of a split as windows of its token stream (config.data.packing='stream'): see the module docstring."""

  def __init__(self, stream: TokenStream, seq_len: int, global_batch_size: int, seed: int, split_id: int,
               eos_id: int, name: str = ''):
    self.stream, self.seq_len, self.global_batch_size = stream, seq_len, global_batch_size
    self.seed, self.split_id, self.eos_id = seed, split_id, eos_id
    self.num_windows = (stream.num_tokens - 1) // seq_len
    if self.num_windows < 1:
      raise preparation.PrepareError(
          f'config.data.seq_len: the {name or "data"} split has {stream.num_tokens} tokens, fewer than one '
          f'window of seq_len+1 = {seq_len + 1}; use a shorter seq_len or more data'
          + (', or a larger config.data.validation_fraction' if split_id % 2 else ''))
    self._orders: dict[int, np.ndarray] = {}
    self._orders_lock = threading.Lock()  # tf.data calls `batch` from several threads

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Window indices in the order epoch `epoch` visits them."""
    with self._orders_lock:
      if epoch not in self._orders:
        if len(self._orders) >= 2:  # batches move forward: keep the current and the next epoch only
          self._orders.pop(min(self._orders))
        rng = np.random.default_rng([self.seed, self.split_id, epoch])
        self._orders[epoch] = rng.permutation(self.num_windows)
      return self._orders[epoch]

  def windows_at(self, positions: np.ndarray) -> np.ndarray:
    """The windows at `positions` of the concatenated epoch orders (position p = epoch p // W, entry p % W)."""
    epochs, offsets = np.divmod(positions, self.num_windows)
    windows = np.empty(positions.size, np.int64)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      windows[where] = self.epoch_order(int(epoch))[offsets[where]]
    return windows

  def rows_at(self, numbers: np.ndarray) -> Batch:
    return pack_windows(self.stream.read_rows(self.windows_at(numbers) * self.seq_len, self.seq_len + 1),
                        self.eos_id)


class DocumentSplit(Rows):
  """Rows of a split made of whole documents (config.data.packing='documents'): see document_packing.py."""

  def __init__(self, stream: TokenStream, seq_len: int, global_batch_size: int, seed: int, split_id: int,
               eos_id: int, name: str = ''):
    self.stream, self.seq_len, self.global_batch_size = stream, seq_len, global_batch_size
    self.seed, self.split_id, self.eos_id = seed, split_id, eos_id
    self.document_starts, self.document_lengths = document_packing.document_spans(stream, eos_id)
    if not (self.document_lengths > 1).any():
      raise preparation.PrepareError(f'the {name or "data"} split has no document of two tokens or more to train on')
    self._rows_before = [0]  # rows of the epochs before epoch e, for e = 0 .. (epochs packed so far)
    self._plans: dict[int, document_packing.EpochPlan] = {}
    self._lock = threading.RLock()  # tf.data calls `batch` from several threads

  def plan(self, epoch: int) -> document_packing.EpochPlan:
    """Epoch `epoch`'s packing (the last two packed are kept: batches move forward)."""
    with self._lock:
      if epoch not in self._plans:
        if len(self._plans) >= 2:
          self._plans.pop(min(self._plans))
        self._plans[epoch] = document_packing.EpochPlan(self.document_starts, self.document_lengths, self.seq_len,
                                                        self.seed, self.split_id, epoch)
      return self._plans[epoch]

  def locate(self, number: int) -> tuple[int, int]:
    """(epoch, row in the epoch) of global row `number`; packs the epochs before it the first time."""
    with self._lock:
      while self._rows_before[-1] <= number:
        epoch = len(self._rows_before) - 1
        self._rows_before.append(self._rows_before[-1] + self.plan(epoch).num_rows)
      epoch = int(np.searchsorted(self._rows_before, number, side='right')) - 1
      return epoch, number - self._rows_before[epoch]

  def rows_at(self, numbers: np.ndarray) -> Batch:
    located = [self.locate(int(number)) for number in numbers]
    return document_packing.fill_rows(self.stream, [(self.plan(epoch), row) for epoch, row in located],
                                      self.seq_len, self.eos_id)


PACKINGS = {'stream': PackedSplit, 'documents': DocumentSplit}  # config.data.packing -> how rows are cut


def open_rows(config, stream: TokenStream, split_id: int, eos_id: int, name: str) -> Rows:
  """The split's rows under config.data.packing."""
  return PACKINGS[config.data.packing](stream, config.data.seq_len, config.data.global_batch_size,
                                       config.data.seed, split_id, eos_id, name=name)


def _role(config, split: str) -> str:
  """'train' / 'validation'; the configured TFDS split names are accepted for them too."""
  if split in ('train', config.data.train_split):
    return 'train'
  if split in ('validation', 'eval', config.data.eval_split):
    return 'validation'
  raise ConfigError(f'unknown split {split!r}; expected train or validation (config.data.train_split='
                   f'{config.data.train_split!r}, config.data.eval_split={config.data.eval_split!r})')


def check_seq_len(config) -> None:
  """data.seq_len must be positive and fit the model (data.check_config; also before a split is opened)."""
  if config.data.seq_len <= 0:
    fail('data.seq_len', f'must be positive, got {config.data.seq_len}')
  if config.data.seq_len > config.model.max_seq_len:
    fail('data.seq_len', f'{config.data.seq_len} is longer than model.max_seq_len={config.model.max_seq_len}')


def open_split(config, split: str = 'train', workdir: str | None = None) -> Rows:
  """The prepared split's rows (a `PackedSplit` or a `DocumentSplit`, by config.data.packing), after checking the
  config and the workdir's tokenizer against it."""
  check_seq_len(config)
  role = _role(config, split)
  directory = preparation.output_dir(config, workdir)
  index = preparation.load_index(directory)
  tokenizer = tokenizer_lib.load(storage.join(directory, index['tokenizer']['file']))
  tokenizer_lib.check_vocab(config, tokenizer)
  if workdir:
    tokenizer_lib.check_workdir(workdir, tokenizer)
  stream = TokenStream(preparation.read_split_tokens(directory, index, role))
  return open_rows(config, stream, _SPLIT_IDS[role], index['tokenizer']['eos_id'], role)


def make_iterator(config, split: str = 'train', start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, workdir: str | None = None) -> Iterator[Batch]:
  """Batches start_step, start_step+1, ... (this process's slice), endless, built by tf.data with prefetching."""
  if config.data.global_batch_size % process_count:
    raise ConfigError(f'config.data.global_batch_size: {config.data.global_batch_size} is not divisible by '
                     f'the {process_count} processes')
  return batch_iterator(open_split(config, split, workdir), config, start_step, process_index, process_count)


def batch_iterator(batches, config, start_step: int, process_index: int, process_count: int) -> Iterator[Batch]:
  """`batches.batch(step, process_index, process_count)` for step = start_step, start_step+1, ..., endless, made
  by tf.data with prefetching (any object with that method: a PackedSplit, a mixture)."""
  # The pipeline only gathers integers: TensorFlow's oneDNN kernels bring nothing but a start-up banner.
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  rows, seq_len = config.data.global_batch_size // process_count, config.data.seq_len

  def make_batch(step):
    batch = batches.batch(int(step), process_index, process_count)
    return tuple(batch[key] for key in _BATCH_KEYS)

  def to_dict(*arrays):
    for array in arrays:
      array.set_shape((rows, seq_len))
    return dict(zip(_BATCH_KEYS, arrays))

  dataset = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
  dataset = dataset.map(lambda step: tf.numpy_function(make_batch, [step], [tf.int32] * 4 + [tf.float32],
                                                       stateful=False),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.map(to_dict).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 2  # numpy holds the GIL; more threads only contend
  dataset = dataset.with_options(options)
  return _ClosedAtExit(dataset.as_numpy_iterator())


class _ClosedAtExit:
  """Wraps a tf.data iterator so that it is deleted before the interpreter shuts down: a live iterator whose
  map calls Python (numpy_function) otherwise deadlocks the interpreter's exit."""

  _live: weakref.WeakSet = weakref.WeakSet()

  def __init__(self, iterator):
    self._iterator = iterator
    self._live.add(self)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._iterator is None:
      raise StopIteration
    return self._iterator.next()

  def close(self) -> None:
    self._iterator = None

  @classmethod
  def close_all(cls) -> None:
    for iterator in list(cls._live):
      iterator.close()


atexit.register(_ClosedAtExit.close_all)
