"""Packed tf.data batches: format against an independent packer, exact resume, process slices, epochs, TFDS."""

import itertools
import os

import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import data
from llm_jax.data import pipeline
from llm_jax.data import preparation
from llm_jax.data import sources

_WORDS = ('one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten', 'river', 'stone')
EOS = 1


def make_config(**data_fields):
  c = config_lib.get_config()
  c.model.vocab_size = 400
  c.model.max_seq_len = 64
  c.data.source = 'text_files'
  c.data.seq_len = 16
  c.data.global_batch_size = 8
  c.data.validation_fraction = 0.2
  for name, value in data_fields.items():
    c.data[name] = value
  return c


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  rng = np.random.default_rng(0)
  for i in range(40):
    lines = [' '.join(rng.choice(_WORDS, size=int(rng.integers(2, 8)))) for _ in range(int(rng.integers(1, 6)))]
    (root / f'doc{i}.txt').write_text('\n'.join(lines))
  config = make_config(paths=str(root / '*.txt'))
  workdir = str(root / 'work')
  index = preparation.prepare(config, workdir, progress=False)
  return config, workdir, index


def reference_pack(row):
  """Packing of one row of seq_len+1 tokens, written as a plain loop."""
  segments, positions, segment, position = [], [], 1, 0
  for token in row:
    segments.append(segment)
    positions.append(position)
    position += 1
    if token == EOS:  # the EOS belongs to the document it ends; the next token starts a new one
      segment, position = segment + 1, 0
  mask = [1.0 if row[j] != EOS else 0.0 for j in range(len(row) - 1)]
  return segments[:-1], positions[:-1], mask


def take(iterator, count):
  return list(itertools.islice(iterator, count))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def stream_of(config, workdir, index, role):
  directory = preparation.output_dir(config, workdir)
  return np.concatenate(preparation.read_split_tokens(directory, index, role))


def test_pack_windows_against_a_loop():
  rng = np.random.default_rng(1)
  tokens = rng.integers(2, 9, size=(6, 17))
  tokens[rng.random(tokens.shape) < 0.15] = EOS
  tokens[0, 0] = EOS
  tokens[1, -1] = EOS
  batch = pipeline.pack_windows(tokens, EOS)
  for row in range(tokens.shape[0]):
    segments, positions, mask = reference_pack(tokens[row].tolist())
    np.testing.assert_array_equal(batch['segment_ids'][row], segments)
    np.testing.assert_array_equal(batch['positions'][row], positions)
    np.testing.assert_array_equal(batch['loss_mask'][row], mask)
  np.testing.assert_array_equal(batch['inputs'], tokens[:, :-1])
  np.testing.assert_array_equal(batch['targets'], tokens[:, 1:])


def test_pack_documents():
  batch = pipeline.pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13]], seq_len=4, eos_id=EOS)
  np.testing.assert_array_equal(batch['inputs'], [[5, 6, 7, EOS], [8, 9, EOS, 10]])
  np.testing.assert_array_equal(batch['targets'], [[6, 7, EOS, 8], [9, EOS, 10, 11]])
  np.testing.assert_array_equal(batch['segment_ids'], [[1, 1, 1, 1], [1, 1, 1, 2]])
  np.testing.assert_array_equal(batch['positions'], [[0, 1, 2, 3], [0, 1, 2, 0]])
  np.testing.assert_array_equal(batch['loss_mask'], [[1, 1, 1, 0], [1, 1, 0, 1]])


def test_batches_are_windows_of_the_stream(prepared):
  config, workdir, index = prepared
  stream = stream_of(config, workdir, index, 'train')
  seq_len, batch_size = config.data.seq_len, config.data.global_batch_size
  num_windows = (stream.size - 1) // seq_len
  batches = take(data.make_iterator(config, 'train', workdir=workdir), 2 * num_windows // batch_size + 1)
  for batch in batches:
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        'inputs': (np.int32, (8, 16)), 'targets': (np.int32, (8, 16)), 'segment_ids': (np.int32, (8, 16)),
        'positions': (np.int32, (8, 16)), 'loss_mask': (np.float32, (8, 16))}
  rows = np.concatenate([np.concatenate([b['inputs'], b['targets'][:, -1:]], axis=1) for b in batches])
  starts = [w * seq_len for w in range(num_windows)]
  windows = {tuple(stream[s:s + seq_len + 1]) for s in starts}
  assert all(tuple(row) in windows for row in rows)
  # Each epoch visits every window once: the first num_windows rows are a permutation of all windows.
  first_epoch = sorted(tuple(row) for row in rows[:num_windows])
  assert first_epoch == sorted(tuple(stream[s:s + seq_len + 1]) for s in starts)
  assert not np.array_equal(rows[:num_windows], rows[num_windows:2 * num_windows])  # a new order each epoch
  for batch in batches:  # segment ids and positions follow the EOS positions
    for row in range(batch_size):
      full = batch['inputs'][row].tolist() + [batch['targets'][row, -1]]
      segments, positions, mask = reference_pack(full)
      np.testing.assert_array_equal(batch['segment_ids'][row], segments)
      np.testing.assert_array_equal(batch['positions'][row], positions)
      np.testing.assert_array_equal(batch['loss_mask'][row], mask)


def test_resume_process_slices_and_epoch_boundaries(prepared):
  config, workdir, _ = prepared
  packed = pipeline.open_split(config, 'train', workdir)
  steps = 3 * packed.num_windows // config.data.global_batch_size + 2  # crosses two epoch boundaries
  reference = take(data.make_iterator(config, 'train', workdir=workdir), steps)
  for start in (1, packed.num_windows // config.data.global_batch_size, steps - 3):
    assert_batches_equal(take(data.make_iterator(config, 'train', start, workdir=workdir), steps - start),
                         reference[start:])
  for process_count in (2, 4):
    slices = [take(data.make_iterator(config, 'train', 0, p, process_count, workdir), steps)
              for p in range(process_count)]
    joined = [{key: np.concatenate([s[k][key] for s in slices]) for key in reference[0]} for k in range(steps)]
    assert_batches_equal(joined, reference)


def test_seed_changes_the_order_and_eval_restarts(prepared):
  config, workdir, _ = prepared
  train = take(data.make_iterator(config, 'train', workdir=workdir), 3)
  other = config.copy_and_resolve_references()
  other.data.seed = 1
  assert not np.array_equal(take(data.make_iterator(other, 'train', workdir=workdir), 1)[0]['inputs'],
                            train[0]['inputs'])
  first = take(data.make_iterator(config, 'validation', workdir=workdir), 3)
  assert_batches_equal(take(data.make_iterator(config, config.data.eval_split, workdir=workdir), 3), first)
  assert not np.array_equal(first[0]['inputs'], train[0]['inputs'])


def test_errors(prepared, tmp_path):
  config, workdir, _ = prepared
  too_long = config.copy_and_resolve_references()
  too_long.data.seq_len = 128
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.seq_len: 128 is longer than model\.max_seq_len'):
    data.make_iterator(too_long, 'train', workdir=workdir)
  small_vocab = config.copy_and_resolve_references()
  small_vocab.model.vocab_size = 100
  with pytest.raises(ValueError, match=r'config\.model\.vocab_size'):
    data.make_iterator(small_vocab, 'train', workdir=workdir)
  with pytest.raises(preparation.PrepareError, match=r'index\.json: not found; run `python -m llm_jax\.data\.prepare'):
    data.make_iterator(config, 'train', workdir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown split 'test'"):
    data.make_iterator(config, 'test', workdir=workdir)
  huge = config.copy_and_resolve_references()
  huge.model.max_seq_len = huge.data.seq_len = 1 << 16
  with pytest.raises(preparation.PrepareError, match=r'config\.data\.seq_len: the validation split has \d+ tokens'):
    data.make_iterator(huge, 'validation', workdir=workdir)


def _mock_lm1b(self, split, **kwargs):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  del self, kwargs
  rng = np.random.default_rng(0 if split == 'train' else 1)
  count = 200 if split == 'train' else 30
  texts = [' '.join(rng.choice(_WORDS, size=int(rng.integers(4, 12)))) + '.' for _ in range(count)]
  return tf.data.Dataset.from_tensor_slices({'text': [t.encode() for t in texts]})


def test_tfds_source_with_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = make_config(tfds_name='lm1b', train_split='train', eval_split='test', tfds_data_dir=str(tmp_path / 'tfds'))
  config.data.source = 'tfds'
  workdir = str(tmp_path / 'work')
  with tfds.testing.mock_data(as_dataset_fn=_mock_lm1b):
    index = preparation.prepare(config, workdir, progress=False)
  assert index['splits']['train']['num_documents'] == len({t for t in _mock_texts('train')})
  assert index['splits']['validation']['num_documents'] >= 1
  batches = take(data.make_iterator(config, 'test', workdir=workdir), 2)  # the TFDS split name works too
  assert batches[0]['inputs'].shape == (8, 16)
  # Unprepared dataset (no mock): a clear error naming the dataset and where it was looked for.
  with pytest.raises(sources.SourceError, match=r"config\.data\.tfds_name: dataset 'lm1b' is not prepared in"):
    preparation.prepare(config, str(tmp_path / 'work2'), progress=False)
  assert not os.path.exists(tmp_path / 'work2' / 'data')
  config.data.tfds_name = 'no_such_dataset_xyz'
  with pytest.raises(sources.SourceError, match=r"config\.data\.tfds_name: no TFDS dataset named"):
    preparation.prepare(config, str(tmp_path / 'work3'), progress=False)


def _mock_texts(split):
  return [t.decode() for t in _mock_lm1b(None, split).map(lambda e: e['text']).as_numpy_iterator()]
