"""config.data.packing='documents': rows of whole documents, against a plain-loop cutter; exact resume, process
slices and epochs; mixtures; first-fit's fill; a training run on such rows."""

import itertools
import json
import os

import jax
import numpy as np
import pytest

from llm_jax import data
from llm_jax import train
from llm_jax import validation
from llm_jax.data import document_packing
from llm_jax.data import mixture
from llm_jax.data import pipeline
from llm_jax.data import preparation
from helpers import tiny_config
from test_data_pipeline import make_config, prepared  # pylint: disable=unused-import (a fixture)

EOS = 1
SEQ_LEN = 16


def random_stream(rng, lengths):
  """Documents of the given numbers of tokens (the last is the EOS) as one stream, unique contents."""
  documents = [np.append(rng.integers(2, 500, size=n - 1), EOS) for n in lengths]
  return documents, np.concatenate(documents)


def expected_segments(documents, seq_len):
  """Each document's pieces as a plain loop would cut them: up to seq_len (input, target) pairs, i.e. seq_len+1
  tokens, cut every seq_len pairs from the document's start; a document of one token has none."""
  pieces = []
  for tokens in documents:
    pairs = len(tokens) - 1
    for start in range(0, pairs, seq_len):
      pieces.append(tuple(tokens[start:min(start + seq_len, pairs) + 1]))
  return sorted(pieces)


def segments_of(batch):
  """(tokens of each segment as inputs + its last target, its loss mask, its positions) of every row."""
  found = []
  for row in range(batch['inputs'].shape[0]):
    segment_ids = batch['segment_ids'][row]
    for segment in np.unique(segment_ids[segment_ids > 0]):
      where = np.flatnonzero(segment_ids == segment)
      assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), 'a segment is not contiguous'
      tokens = np.append(batch['inputs'][row, where], batch['targets'][row, where[-1]])
      np.testing.assert_array_equal(batch['inputs'][row, where[1:]], batch['targets'][row, where[:-1]])
      found.append((tuple(tokens), batch['loss_mask'][row, where], batch['positions'][row, where]))
  return found


def test_an_epoch_holds_every_document_whole_once():
  rng = np.random.default_rng(0)
  # Short documents, ones of exactly seq_len+1 tokens (one full row), longer ones cut, an EOS alone, and a tail
  # without its EOS.
  lengths = list(rng.integers(2, 12, size=60)) + [SEQ_LEN + 1, SEQ_LEN + 2, 3 * SEQ_LEN + 5, 1, 40]
  lengths = list(rng.permutation(lengths))
  documents, stream = random_stream(rng, lengths)
  documents.append(rng.integers(2, 500, size=5))
  stream = np.concatenate([stream, documents[-1]])
  split = pipeline.DocumentSplit(pipeline.TokenStream([stream[:100], stream[100:]]), SEQ_LEN, 4, seed=3,
                                 split_id=0, eos_id=EOS)
  plan = split.plan(0)
  batch = split.rows_at(np.arange(plan.num_rows))
  found = segments_of(batch)
  assert sorted(tokens for tokens, _, _ in found) == expected_segments(documents, SEQ_LEN)
  for tokens, loss, positions in found:  # every pair of a piece is in the loss, positions restart per piece
    np.testing.assert_array_equal(loss, 1.0)
    np.testing.assert_array_equal(positions, np.arange(len(tokens) - 1))
  padding = batch['segment_ids'] == 0
  assert padding.any() and not batch['loss_mask'][padding].any() and not batch['positions'][padding].any()
  assert np.all(batch['inputs'][padding] == EOS)
  # Targets in the loss: every token but each document's first, once (the stream packing's targets).
  assert batch['loss_mask'].sum() == sum(len(d) - 1 for d in documents)
  assert plan.fill == pytest.approx(batch['loss_mask'].mean())
  # The next epoch: another order of the same rows' contents.
  again = split.rows_at(plan.num_rows + np.arange(split.plan(1).num_rows))
  assert sorted(tokens for tokens, _, _ in segments_of(again)) == expected_segments(documents, SEQ_LEN)
  assert not np.array_equal(again['inputs'][:4], batch['inputs'][:4])


def test_first_fit_fills_rows_without_overlap():
  rng = np.random.default_rng(1)
  capacity = 4096
  sizes = np.minimum(rng.lognormal(6, 1.5, size=20000).astype(np.int64) + 1, capacity)
  row, offset, rows = document_packing.first_fit(sizes, capacity)
  used = np.zeros(rows, np.int64)
  np.add.at(used, row, sizes)
  assert used.max() <= capacity and np.all(offset + sizes <= capacity)
  order = np.lexsort((offset, row))  # within a row, items follow each other without gaps
  for r, o, s, nxt in zip(row[order][:-1], offset[order][:-1], sizes[order][:-1], order[1:]):
    if row[nxt] == r:
      assert offset[nxt] == o + s
  # Measured fill of this lognormal mix (median 400 tokens): 99.6% with 8 open rows; 1 open row (next-fit) ~86%.
  assert sizes.sum() / (rows * capacity) > 0.99
  _, _, next_fit_rows = document_packing.first_fit(sizes, capacity, open_rows=1)
  assert next_fit_rows > rows * 1.1


def test_a_mixture_of_document_rows():
  rng = np.random.default_rng(2)
  sources = [random_stream(rng, rng.integers(2, 3 * SEQ_LEN, size=count)) for count in (50, 20)]
  parts = [pipeline.DocumentSplit(pipeline.TokenStream([stream]), SEQ_LEN, 8, seed=0, split_id=2 * (i + 1),
                                  eos_id=EOS) for i, (_, stream) in enumerate(sources)]
  mixed = mixture.Mixture(parts, [0.75, 0.25], seed=0, split_id=0, global_batch_size=8, seq_len=SEQ_LEN,
                          eos_id=EOS)
  allowed = [set(expected_segments(documents, SEQ_LEN)) for documents, _ in sources]
  batches = [mixed.batch(k) for k in range(40)]
  for batch in batches:
    for row, source in enumerate(batch['source']):
      one = {key: values[row:row + 1] for key, values in batch.items() if key != 'source'}
      assert all(tokens in allowed[source] for tokens, _, _ in segments_of(one))
  assert abs(np.mean(np.concatenate([b['source'] for b in batches]) == 0) - 0.75) < 0.02
  fresh = mixture.Mixture([pipeline.DocumentSplit(pipeline.TokenStream([stream]), SEQ_LEN, 8, seed=0,
                                                  split_id=2 * (i + 1), eos_id=EOS)
                           for i, (_, stream) in enumerate(sources)],
                          [0.75, 0.25], seed=0, split_id=0, global_batch_size=8, seq_len=SEQ_LEN, eos_id=EOS)
  np.testing.assert_array_equal(fresh.batch(39)['inputs'], batches[39]['inputs'])  # resumed: the same rows


def take(iterator, count):
  return list(itertools.islice(iterator, count))


def test_resume_process_slices_and_epochs(prepared):  # pylint: disable=redefined-outer-name
  config, workdir, _ = prepared
  config = config.copy_and_resolve_references()
  config.data.packing = 'documents'
  validation.validate(config, 1)
  split = pipeline.open_split(config, 'train', workdir)
  assert isinstance(split, pipeline.DocumentSplit)
  steps = 2 * split.plan(0).num_rows // config.data.global_batch_size + 3  # crosses two epoch boundaries
  reference = take(data.make_iterator(config, 'train', workdir=workdir), steps)
  for batch in reference:
    assert batch['inputs'].shape == (8, 16) and batch['loss_mask'].dtype == np.float32
  for start in (1, steps - 2):  # a fresh split packs the epochs before the step again
    resumed = take(data.make_iterator(config, 'train', start, workdir=workdir), steps - start)
    for got, want in zip(resumed, reference[start:]):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  halves = [pipeline.open_split(config, 'train', workdir).batch(steps - 1, p, 2) for p in (0, 1)]
  for key in reference[-1]:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), reference[-1][key], err_msg=key)
  # Each row's segments are pieces of the split's documents, cut as the plain loop cuts them.
  stream = np.concatenate(preparation.read_split_tokens(preparation.output_dir(config, workdir),
                                                        preparation.load_index(
                                                            preparation.output_dir(config, workdir)), 'train'))
  ends = np.flatnonzero(stream == split.eos_id)
  documents = [stream[a:b + 1].astype(np.int64) for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]
  allowed = set(expected_segments(documents, config.data.seq_len))
  assert all(tokens in allowed for batch in reference for tokens, _, _ in segments_of(batch))
  config.data.packing = 'windows'
  with pytest.raises(data.ConfigError, match=r'config\.data\.packing: unknown value .windows.'):
    validation.validate(config, 1)


def test_training_on_document_rows(prepared, tmp_path):  # pylint: disable=redefined-outer-name
  config, workdir, _ = prepared
  run = tiny_config(model=dict(vocab_size=config.model.vocab_size, max_seq_len=64),
                    data=dict(source='text_files', paths=config.data.paths, packing='documents', seq_len=16,
                              prepared_dir=preparation.output_dir(config, workdir)),
                    train=dict(steps=12), eval=dict(every=6, steps=2))
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(run, workdir, devices=jax.devices()[:1])
  assert result['step'] == 12
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  losses = [row['loss'] for row in rows if 'loss' in row]
  evals = [row['eval_loss'] for row in rows if 'eval_loss' in row]
  assert len(evals) == 2 and all(np.isfinite(evals)) and evals[1] < evals[0]
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
