"""A deterministic, learnable token stream that needs no files and no TensorFlow.

Each row of a batch is a few "documents"; a document is an arithmetic progression modulo the vocabulary,
x[t+1] = (x[t] + stride) % vocab, with a random start and a stride from a small set. The first two tokens of a
document reveal the rule, so a model can drive the loss far below log(vocab): useful to check that training
works on any accelerator. Row r of batch k depends only on (seed, split, k, r).
"""

from __future__ import annotations

import numpy as np

_STRIDES = (1, 2, 3, 5, 7)
_SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}


def prepare(config, workdir=None) -> None:
  del config, workdir  # nothing to prepare


def _row(seed: int, split_id: int, step: int, row: int, seq_len: int, vocab: int, mean_doc_len: int):
  rng = np.random.default_rng([seed, split_id, step, row])
  tokens = np.empty(seq_len + 1, np.int64)
  segments = np.empty(seq_len + 1, np.int32)
  positions = np.empty(seq_len + 1, np.int32)
  start, segment = 0, 1
  while start < seq_len + 1:
    length = int(min(seq_len + 1 - start, max(4, rng.geometric(1.0 / mean_doc_len))))
    first = int(rng.integers(vocab))
    stride = _STRIDES[int(rng.integers(len(_STRIDES)))]
    tokens[start:start + length] = (first + stride * np.arange(length)) % vocab
    segments[start:start + length] = segment
    positions[start:start + length] = np.arange(length)
    start += length
    segment += 1
  return tokens, segments, positions


def make_batch(config, split: str, step: int, process_index: int = 0, process_count: int = 1):
  """This process's slice of global batch `step` of `split`."""
  seq_len, vocab = config.data.seq_len, config.model.vocab_size
  per_process = config.data.global_batch_size // process_count
  mean_doc_len = max(8, seq_len // 2)
  split_id = _SPLIT_IDS.get(split, 3)
  rows = [_row(config.data.seed, split_id, step, process_index * per_process + i, seq_len, vocab, mean_doc_len)
          for i in range(per_process)]
  tokens, segments, positions = (np.stack(parts) for parts in zip(*rows))
  # A target counts only when it continues the same document as its input token.
  same_doc = segments[:, 1:] == segments[:, :-1]
  return {
      'inputs': tokens[:, :-1].astype(np.int32),
      'targets': tokens[:, 1:].astype(np.int32),
      'segment_ids': segments[:, :-1],
      'positions': positions[:, :-1],
      'loss_mask': same_doc.astype(np.float32),
  }


def make_iterator(config, split='train', start_step=0, process_index=0, process_count=1, workdir=None):
  del workdir
  step = start_step
  while True:
    yield make_batch(config, split, step, process_index, process_count)
    step += 1
