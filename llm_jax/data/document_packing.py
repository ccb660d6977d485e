"""Rows of whole documents (config.data.packing='documents'), for long-context training.

The stream packing (pipeline.py) cuts the token stream `doc EOS doc EOS ...` into windows, so a document is cut
wherever a window happens to end: at 64k tokens a row, most long documents lose their beginning or their end to
another row, and the model never sees the long dependencies such a run is for. Here rows are made of documents:

- A document is a run of the stream up to and including the EOS that ends it (a tail without one is a document
  too). Its n tokens give n - 1 (input, target) pairs, all in the loss: the same targets the stream packing trains
  on (a document's first token is not predicted, its EOS is), without spending a position on the EOS as input.
- A document of at most seq_len pairs is never cut. A longer one is cut every seq_len pairs from its start (the
  fewest cuts: every piece but the last fills a row alone), and the last piece is packed like a document.
  Positions restart at 0 in each piece, as the stream packing does for a document a window starts inside.
- Pieces are packed in the epoch's document order, first-fit over `OPEN_ROWS` open rows: a piece goes to the
  first open row it fits in; when none has room, the fullest open row is closed (its rest is padding: segment 0,
  position 0, loss 0, the EOS id as token) and a new row opened. The epoch's rows are then shuffled, so that the
  pieces of a long document do not travel together in one batch.

Order and resume: epoch e visits the documents in the order `default_rng([seed, split_id, e]).permutation(D)` and
its rows in the order `default_rng([seed, split_id, e, 1]).permutation(R_e)`; the epochs' rows are concatenated and
global batch k is rows [k*B, (k+1)*B) of them (process p of P takes its B/P). Row r is so a pure function of
(seed, r): resume is exact and a batch does not depend on the number of processes. Epochs differ in their number
of rows, so reaching row r packs the epochs before it once (their row counts are kept, the plans of two epochs).
Packing is a Python loop over the pieces (about a second per million documents); finding the documents reads the
split once when it is opened (memory-mapped shards in chunks; a split in a bucket is downloaded once for it).
"""

from __future__ import annotations

import numpy as np

OPEN_ROWS = 8  # first-fit's open rows: more fill rows better and pack slower (fill: see test_document_packing)
_SCAN_TOKENS = 1 << 24  # tokens read at a time while looking for the documents


def document_spans(stream, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(first token, number of tokens with the EOS) of each document of `stream` (a pipeline.TokenStream), in
  stream order."""
  ends = []
  buffer = np.empty(min(_SCAN_TOKENS, stream.num_tokens), np.int32)
  for start in range(0, stream.num_tokens, _SCAN_TOKENS):
    part = buffer[:min(_SCAN_TOKENS, stream.num_tokens - start)]
    stream.read_into(part, start)
    ends.append(start + np.flatnonzero(part == eos_id))
  ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
  if stream.num_tokens and (not ends.size or ends[-1] != stream.num_tokens - 1):
    ends = np.append(ends, stream.num_tokens - 1)  # a tail without its EOS
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  return starts, (ends - starts + 1).astype(np.int64)


def pieces(starts: np.ndarray, lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(first token, pairs) of the pieces of the documents (starts, lengths) in their order: a document of n tokens
  has n - 1 pairs, cut every seq_len pairs from its start; documents of one token (an EOS alone) have none."""
  pairs = lengths - 1
  keep = pairs > 0
  starts, pairs = starts[keep], pairs[keep]
  count = -(-pairs // seq_len)
  document = np.repeat(np.arange(pairs.size), count)
  index = np.arange(document.size) - np.repeat(np.cumsum(count) - count, count)  # piece number in its document
  return starts[document] + index * seq_len, np.minimum(seq_len, pairs[document] - index * seq_len)


def first_fit(sizes: np.ndarray, capacity: int, open_rows: int = OPEN_ROWS) -> tuple[np.ndarray, np.ndarray, int]:
  """(row, offset in the row) of each item of `sizes` (each <= capacity) packed in order first-fit over
  `open_rows` open rows (see the module docstring), and the number of rows; rows are numbered as they open."""
  row_of = np.empty(sizes.size, np.int64)
  offset_of = np.empty(sizes.size, np.int64)
  rows, open_ids, open_used = 0, [], []
  for item, size in enumerate(sizes.tolist()):
    if size == capacity:  # fills a row alone: no open row has room, and none needs closing for it
      row_of[item], offset_of[item], rows = rows, 0, rows + 1
      continue
    slot = next((i for i, used in enumerate(open_used) if used + size <= capacity), None)
    if slot is None:
      if len(open_used) == open_rows:
        fullest = open_used.index(max(open_used))
        del open_ids[fullest], open_used[fullest]
      open_ids.append(rows)
      open_used.append(0)
      rows += 1
      slot = len(open_used) - 1
    row_of[item], offset_of[item] = open_ids[slot], open_used[slot]
    open_used[slot] += size
    if open_used[slot] == capacity:
      del open_ids[slot], open_used[slot]
  return row_of, offset_of, rows


class EpochPlan:
  """Where every piece of one epoch goes: its items sorted by row (then offset), `row_first[r]` the first item of
  row r (row_first[-1] = the number of items)."""

  def __init__(self, starts: np.ndarray, lengths: np.ndarray, seq_len: int, seed: int, split_id: int, epoch: int):
    order = np.random.default_rng([seed, split_id, epoch]).permutation(starts.size)
    first_token, pairs = pieces(starts[order], lengths[order], seq_len)
    row, offset, self.num_rows = first_fit(pairs, seq_len)
    rank = np.empty(self.num_rows, np.int64)  # the opened rows, shuffled
    rank[np.random.default_rng([seed, split_id, epoch, 1]).permutation(self.num_rows)] = np.arange(self.num_rows)
    row = rank[row]
    by_row = np.lexsort((offset, row))
    self.first_token, self.pairs, self.offset = first_token[by_row], pairs[by_row], offset[by_row]
    self.row_first = np.searchsorted(row[by_row], np.arange(self.num_rows + 1))
    self.fill = float(pairs.sum()) / max(1, self.num_rows * seq_len)  # share of positions that hold a pair


def fill_rows(stream, plans: list[tuple[EpochPlan, int]], seq_len: int, eos_id: int) -> dict[str, np.ndarray]:
  """The batch of rows (plan, row number in its epoch), read from `stream` (see the module docstring)."""
  batch = {key: np.zeros((len(plans), seq_len), np.int32) for key in ('inputs', 'targets', 'segment_ids',
                                                                       'positions')}
  batch['inputs'][:] = batch['targets'][:] = eos_id
  batch['loss_mask'] = np.zeros((len(plans), seq_len), np.float32)
  items = [(out_row, segment, plan.first_token[i], int(plan.pairs[i]), int(plan.offset[i]))
           for out_row, (plan, row) in enumerate(plans)
           for segment, i in enumerate(range(plan.row_first[row], plan.row_first[row + 1]), 1)]
  spans = stream.read_spans([item[2] for item in items], [item[3] + 1 for item in items])
  for (out_row, segment, _, pairs, offset), tokens in zip(items, spans):
    place = slice(offset, offset + pairs)
    batch['inputs'][out_row, place] = tokens[:-1]
    batch['targets'][out_row, place] = tokens[1:]
    batch['segment_ids'][out_row, place] = segment
    batch['positions'][out_row, place] = np.arange(pairs)
    batch['loss_mask'][out_row, place] = 1.0
  return batch
