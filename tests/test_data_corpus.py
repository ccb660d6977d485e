"""Real corpora: documents inside files, a validation split that always exists, bad input, cleaning, workers."""

import json
import os
import threading

import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax.data import pipeline
from llm_jax.data import preparation
from llm_jax.data import preparation_tasks
from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib

_WORDS = ('the of and to in a is that it was for on are as with his they at be this from have or by one had not '
          'but what all were when we there can an your which their said if do will each about how up out them then '
          'she many some so these would other into has more her two like him see time could no make than first '
          'been its who now people my made over did down only way find use may water long little very after words '
          'called just where most know river stone light sound table garden window morning').split()


def prose(rng, sentences=(3, 8)) -> str:
  return " ".join((" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 7)))) + " and the "
                   + " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 7))))).capitalize() + "."
                  for _ in range(int(rng.integers(*sentences))))


def make_config(paths, **data_fields):
  c = config_lib.get_config()
  c.model.vocab_size = 320
  c.model.max_seq_len = 64
  c.data.source = 'text_files'
  c.data.paths = paths
  c.data.seq_len = 32
  c.data.global_batch_size = 8
  c.data.prepare_workers = 1
  for name, value in data_fields.items():
    c.data[name] = value
  return c


def split_stream(directory, index, role):
  return np.concatenate(preparation.read_split_tokens(directory, index, role)).astype(np.int64)


def documents_of(stream, eos):
  ends = np.flatnonzero(stream == eos)
  return [tuple(d) for d in np.split(stream, ends + 1)[:-1]]


def test_single_file_is_held_out_by_tokens_at_its_tail(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / 'input.txt'  # one big file, default settings: one document
  path.write_text('\n'.join(prose(rng) for _ in range(400)))
  config = make_config(str(path))
  index = preparation.prepare(config, str(tmp_path / 'work'), progress=False)
  directory = str(tmp_path / 'work' / 'data')
  train, validation = split_stream(directory, index, 'train'), split_stream(directory, index, 'validation')
  holdout = index['validation_holdout']
  assert holdout['by'] == 'tokens' and not holdout['cut_at_document_boundary']
  # Independent check: the whole file tokenized is train's head followed by validation, without overlap.
  tok = tokenizer_lib.load(os.path.join(directory, 'tokenizer.model'))
  whole = np.asarray(tok.encode(sources.clean(path.read_text())) + [tok.eos_id])
  assert train[-1] == tok.eos_id  # the head ends with an EOS of its own
  np.testing.assert_array_equal(np.concatenate([train[:-1], validation]), whole)
  share = validation.size / whole.size
  assert abs(share - config.data.validation_fraction) < 1e-3, share
  # Deterministic: a second preparation elsewhere gives the same bytes.
  again = preparation.prepare(config, str(tmp_path / 'again'), progress=False)
  np.testing.assert_array_equal(split_stream(str(tmp_path / 'again' / 'data'), again, 'validation'), validation)
  batch = pipeline.open_split(config, 'validation', str(tmp_path / 'work')).batch(0)  # no TensorFlow needed
  assert batch['inputs'].shape == (8, 32)


def test_separator_splits_files_and_a_small_folder_cuts_at_a_document_boundary(tmp_path):
  rng = np.random.default_rng(1)
  expected = []
  for i in range(3):
    docs = [prose(rng) for _ in range(30)]
    expected += docs
    (tmp_path / f'part{i}.txt').write_text('\n<|endoftext|>\n'.join(docs))
  (tmp_path / 'notes.bin').write_bytes(b'\x00\x01binary')  # skipped by the folder listing: not .txt/.md/.jsonl
  config = make_config(str(tmp_path), document_separator=r'<\|endoftext\|>', filters='')
  index = preparation.prepare(config, str(tmp_path / 'work'), progress=False)
  directory = str(tmp_path / 'work' / 'data')
  tok = tokenizer_lib.load(os.path.join(directory, 'tokenizer.model'))
  got = [tok.decode(list(d)) for role in ('train', 'validation')
         for d in documents_of(split_stream(directory, index, role), tok.eos_id)]
  assert sorted(got) == sorted(expected)  # each part is one document, none lost, none in both splits
  assert index['splits']['train']['documents_read'] + index['splits']['validation']['documents_read'] == 90
  assert index['skipped_files'] == {'unsupported_type': 1}
  if index['validation_holdout']['by'] == 'tokens':
    assert index['validation_holdout']['cut_at_document_boundary']


def test_bad_separator_is_one_error_naming_the_field(tmp_path):
  config = make_config(str(tmp_path), document_separator='(unclosed')
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.document_separator: .*not a regular'):
    validation.validate(config, 1)
  (tmp_path / 'a.txt').write_text('some text here for a document')
  with pytest.raises(sources.SourceError, match=r'config\.data\.document_separator'):
    preparation.prepare(config, str(tmp_path / 'work'), progress=False)
  assert not os.path.exists(tmp_path / 'work' / 'data')


def test_binary_empty_and_vanishing_files_are_counted_skips(tmp_path, monkeypatch):
  rng = np.random.default_rng(2)
  for i in range(20):
    (tmp_path / f'doc{i}.txt').write_text(prose(rng, (20, 40)))
  (tmp_path / 'empty.txt').write_text('')
  (tmp_path / 'image.txt').write_bytes(bytes(range(256)) * 8)  # NUL bytes: binary
  (tmp_path / 'gone.txt').write_text(prose(rng))
  real = sources.read_bytes

  def vanishing(path):  # the file is listed, then removed before it is read
    if path.endswith('gone.txt'):
      return None
    return real(path)
  monkeypatch.setattr(sources, 'read_bytes', vanishing)
  index = preparation.prepare(make_config(str(tmp_path / '*.txt')), str(tmp_path / 'work'), progress=False)
  assert index['skipped_files'] == {'binary': 1, 'unreadable': 1}
  splits = index['splits']
  assert splits['train']['dropped_short'] + splits['validation']['dropped_short'] == 1  # the empty file
  assert splits['train']['num_documents'] + splits['validation']['num_documents'] >= 20


def trained_tokenizer(tmp_path, seed=0) -> str:
  rng = np.random.default_rng(seed)
  path = tmp_path / 'given.model'
  path.write_bytes(tokenizer_lib.train([prose(rng) for _ in range(300)], 320))
  return str(path)


def test_malformed_jsonl_line_names_file_and_line_with_workers(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'TASK_BYTES', 2_000)  # tasks are cut in this process: several small ones
  rng = np.random.default_rng(3)
  for i in range(4):
    with open(tmp_path / f'part{i}.jsonl', 'w') as f:
      for _ in range(10):
        f.write(json.dumps({'text': prose(rng)}) + '\n')
  with open(tmp_path / 'part2.jsonl', 'a') as f:
    f.write('{"text": broken\n')
  config = make_config(str(tmp_path / '*.jsonl'), prepare_workers=2, tokenizer_path=trained_tokenizer(tmp_path))
  with pytest.raises(sources.SourceError, match=r'part2\.jsonl:11: not valid JSON'):
    preparation.prepare(config, str(tmp_path / 'work'), progress=False)
  assert os.listdir(tmp_path / 'work') == []


def _shingles(text, n=5):
  words = text.lower().replace('.', ' ').split()
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_cleaning_drops_junk_and_near_duplicates_across_splits(tmp_path):
  rng = np.random.default_rng(4)
  clean = [prose(rng, (6, 10)) for _ in range(240)]
  junk = {
      'gopher_quality': [' '.join(rng.choice(['$$', '##', '@@', '%%', '&&', '==', '++'], size=80)) + ' the and of to'
                         for _ in range(12)],  # mostly words without a letter
      'gopher_repetition': ['Buy the cheap watches and rings now at our store today.\n' * 30 for _ in range(12)],
      'c4_quality': [clean[i][:200] + ' lorem ipsum dolor sit amet ' + clean[i + 1][:200] for i in range(12)],
  }
  twins = {i: clean[i] + ' ' + ' '.join(rng.choice(_WORDS, size=2)) + '.' for i in range(0, 240, 6)}  # 40
  records = clean + list(twins.values()) + [t for texts in junk.values() for t in texts]
  order = rng.permutation(len(records))
  path = tmp_path / 'web.jsonl'
  path.write_text(''.join(json.dumps({'text': records[i]}) + '\n' for i in order))
  config = make_config(str(path), filters='gopher_quality,gopher_repetition,c4_quality', near_dedup=True,
                       validation_fraction=0.2)
  index = preparation.prepare(config, str(tmp_path / 'work'), progress=False)
  directory = str(tmp_path / 'work' / 'data')
  tok = tokenizer_lib.load(os.path.join(directory, 'tokenizer.model'))
  kept = {role: [tok.decode(list(d)) for d in documents_of(split_stream(directory, index, role), tok.eos_id)]
          for role in ('train', 'validation')}
  everything = set(kept['train']) | set(kept['validation'])
  splits = index['splits']
  for name, texts in junk.items():  # every injected junk document dropped, by the rule meant for it
    assert not everything & {sources.clean(t) for t in texts}, name
    assert splits['train'][f'dropped_{name}'] + splits['validation'][f'dropped_{name}'] >= len(texts), name
  # Of each near-duplicate pair exactly one survives; all other clean documents survive.
  for i, twin in twins.items():
    assert (clean[i] in everything) + (twin in everything) == 1, i
  others = [t for i, t in enumerate(clean) if i not in twins]
  clean_kept = sum(t in everything for t in others) / len(others)
  near = splits['train']['dropped_near_duplicate'] + splits['validation']['dropped_near_duplicate']
  print(f'junk dropped 36/36, near-duplicates dropped {near}/40, other clean documents kept {clean_kept:.1%}')
  assert near == len(twins) and clean_kept == 1.0
  # No validation document has a near-twin in train (independent check: Jaccard of word 5-gram sets).
  train_sets = [_shingles(t) for t in kept['train']]
  for text in kept['validation']:
    mine = _shingles(text)
    assert all(len(mine & other) / len(mine | other) < 0.5 for other in train_sets)
  assert splits['validation']['num_documents'] > 10


def test_worker_count_does_not_change_the_output(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'TASK_BYTES', 4_000)  # about ten tasks
  rng = np.random.default_rng(5)
  for i in range(30):
    (tmp_path / f'doc{i:02d}.txt').write_text('\n\n'.join(prose(rng) for _ in range(4)))
  (tmp_path / 'copy.txt').write_text((tmp_path / 'doc03.txt').read_text() + ' More words.')  # a near-duplicate
  outputs = {}
  for workers in (1, 2):
    config = make_config(str(tmp_path / '*.txt'), document_separator=r'\n\s*\n', near_dedup=True,
                         prepare_workers=workers, prepared_dir=str(tmp_path / f'out{workers}'))
    index = preparation.prepare(config, None, progress=False)
    assert index['workers'] == workers
    outputs[workers] = {name: (tmp_path / f'out{workers}' / name).read_bytes()
                        for name in sorted(os.listdir(tmp_path / f'out{workers}')) if name != 'index.json'}
    for timing in ('seconds', 'input_mb_per_s', 'workers'):
      index.pop(timing)
    outputs[workers]['index.json'] = index
  assert outputs[1].keys() == outputs[2].keys() and len(outputs[1]) >= 4
  for name in outputs[1]:
    assert outputs[1][name] == outputs[2][name], name
  splits = outputs[1]['index.json']['splits']
  assert splits['train']['dropped_near_duplicate'] + splits['validation']['dropped_near_duplicate'] >= 1


_real_wait = preparation_tasks._wait_for_tasks


def _real_wait_fast(work, count, poll_seconds):
  del poll_seconds
  return _real_wait(work, count, 0.05)


def test_tasks_on_a_cluster_style_executor_give_the_same_output(tmp_path, monkeypatch):
  """A cluster executor (Slurm's) returns from run() once the jobs are submitted: preparation waits for the task
  files, then assembles. Here a thread plays the cluster, running the very step datatrove would run."""
  monkeypatch.setattr(sources, 'TASK_BYTES', 3_000)
  rng = np.random.default_rng(6)
  for i in range(12):
    (tmp_path / f'doc{i:02d}.txt').write_text(prose(rng, (20, 40)))
  given = trained_tokenizer(tmp_path)

  class SubmitsAndReturns:
    def __init__(self, step, num_tasks):
      self.step, self.num_tasks = step, num_tasks

    def run(self):
      threading.Thread(target=lambda: [self.step.run(None, rank, self.num_tasks)
                                       for rank in reversed(range(self.num_tasks))]).start()

  outputs = []
  for name, executor in (('local', None), ('cluster', lambda step, n: SubmitsAndReturns(step, n)),
                         ('datatrove', preparation_tasks.datatrove_executor('local', {'workers': 2},
                                                                            str(tmp_path / 'logs')))):
    config = make_config(str(tmp_path / '*.txt'), tokenizer_path=given, prepared_dir=str(tmp_path / name))
    monkeypatch.setattr(preparation_tasks, '_wait_for_tasks', _real_wait_fast)
    preparation.prepare(config, None, progress=False, executor=executor)
    outputs.append({f: (tmp_path / name / f).read_bytes() for f in sorted(os.listdir(tmp_path / name))
                    if f.endswith('.bin')})
  assert len(outputs[0]) == 2 and outputs[0] == outputs[1] == outputs[2]
