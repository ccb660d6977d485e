"""Preparation: documents in the shards match an independent reading of the files, reuse, atomicity, errors."""

import collections
import glob
import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.data import preparation
from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib

_WORDS = ('alpha', 'beta', 'gamma', 'delta', 'value', 'return', 'model', 'token', 'data', 'train', 'über', 'naïve',
          'print', 'self', 'index', 'table', 'river', 'stone', 'light', 'sound')
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _document(rng) -> str:
  lines = []
  for _ in range(int(rng.integers(3, 12))):
    indent = '    ' * int(rng.integers(3))
    lines.append(indent + ' '.join(rng.choice(_WORDS, size=int(rng.integers(3, 10)))))
  return '\n'.join(lines)


def write_corpus(directory, num_files=150, num_records=150, seed=0):
  """.txt files and one .jsonl of generated text, plus a duplicate, a too-short and a non-UTF-8 file.

  Returns {key: expected cleaned text} of every document that should survive cleaning (the duplicate's key
  included: which twin is kept depends on the split each key hashes into), and the number of bad bytes.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  expected = {}
  for i in range(num_files):
    text = _document(rng)
    path = os.path.join(directory, f'doc{i:03d}.txt')
    with open(path, 'w') as f:
      f.write('\n' + text + '  \n\n')  # leading blank lines and trailing whitespace are stripped
    expected[path] = text
  with open(os.path.join(directory, 'records.jsonl'), 'w') as f:
    for i in range(num_records):
      text = _document(rng)
      f.write(json.dumps({'text': text, 'id': i}) + '\n')
      expected[f'{os.path.join(directory, "records.jsonl")}:{i + 1}'] = text
  with open(os.path.join(directory, 'duplicate.txt'), 'w') as f:
    f.write(expected[os.path.join(directory, 'doc000.txt')])
  expected[os.path.join(directory, 'duplicate.txt')] = expected[os.path.join(directory, 'doc000.txt')]
  with open(os.path.join(directory, 'short.md'), 'w') as f:
    f.write('tiny')
  bad_path = os.path.join(directory, 'latin1.txt')
  with open(bad_path, 'wb') as f:
    f.write('caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \r\n'.encode('latin-1') * 4)  # 3 bad bytes a line
  expected[bad_path] = '\n'.join(['caf\ufffd cr\ufffdme br\ufffdl\ufffde '] * 4).strip()
  return expected, 4 * 4


def _is_validation(key, fraction=0.02):  # independent of sources.role_of
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big') < fraction * 2**64


def make_config(paths, vocab_size=400, **data):
  c = config_lib.get_config()
  c.model.vocab_size = vocab_size
  c.model.max_seq_len = 256
  c.data.source = 'text_files'
  c.data.paths = paths
  c.data.seq_len = 32
  c.data.global_batch_size = 8
  for name, value in data.items():
    c.data[name] = value
  return c


# The keys hash into the splits by their absolute paths, which change from run to run: a tenth in validation
# keeps the share by documents near the wanted one (else preparation holds out the stream's tail instead) for
# any paths, and puts doc000.txt and its twin in different splits often enough to matter.
_VALIDATION_FRACTION = 0.1


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  expected, bad_bytes = write_corpus(str(root / 'text'))
  config = make_config(f'{root}/text/*.txt,{root}/text/*.md,{root}/text/*.jsonl',
                       validation_fraction=_VALIDATION_FRACTION)
  workdir = str(root / 'work')
  index = preparation.prepare(config, workdir, progress=False)
  return dict(config=config, workdir=workdir, index=index, expected=expected, bad_bytes=bad_bytes,
              directory=os.path.join(workdir, 'data'))


def _documents_in_shards(directory, index, role):
  tok = tokenizer_lib.load(os.path.join(directory, 'tokenizer.model'))
  stream = np.concatenate(preparation.read_split_tokens(directory, index, role))
  assert stream[-1] == tok.eos_id
  ends = np.flatnonzero(stream == tok.eos_id)
  return [tok.decode(doc) for doc in np.split(stream, ends + 1)[:-1]]


def _expected_splits(expected: dict) -> dict:
  """Each distinct text once: in train when any of its keys hashes into train (train's twin wins), else in
  validation."""
  roles = collections.defaultdict(set)
  for key, text in expected.items():
    roles[text].add('validation' if _is_validation(key, _VALIDATION_FRACTION) else 'train')
  return {role: sorted(text for text, of_text in roles.items() if role == ('train' if 'train' in of_text else
                                                                            'validation'))
          for role in ('train', 'validation')}


def test_shards_hold_the_cleaned_documents_of_each_split(corpus):
  assert corpus['index']['validation_holdout']['by'] == 'documents'
  want = _expected_splits(corpus['expected'])
  for role in ('train', 'validation'):
    got = sorted(_documents_in_shards(corpus['directory'], corpus['index'], role))
    assert got == want[role], role
  splits = corpus['index']['splits']
  assert splits['validation']['num_documents'] >= 1
  assert splits['train']['dropped_duplicate'] + splits['validation']['dropped_duplicate'] == 1
  assert splits['train']['dropped_short'] + splits['validation']['dropped_short'] == 1
  assert splits['train']['replaced_bytes'] + splits['validation']['replaced_bytes'] == corpus['bad_bytes']


def test_index_and_workdir_tokenizer(corpus):
  index, directory = corpus['index'], corpus['directory']
  fingerprint = tokenizer_lib.file_fingerprint(os.path.join(directory, 'tokenizer.model'))
  assert index['tokenizer']['fingerprint'] == fingerprint
  assert tokenizer_lib.load_from_workdir(corpus['workdir']).fingerprint == fingerprint
  assert index['tokenizer']['eos_id'] == tokenizer_lib.EOS_ID
  assert index['token_dtype'] == '<u2'
  for role, split in index['splits'].items():
    assert split['num_tokens'] == sum(s['num_tokens'] for s in split['shards'])
    for shard in split['shards']:
      assert os.path.getsize(os.path.join(directory, shard['file'])) == 2 * shard['num_tokens']


def test_a_newline_is_a_piece_not_a_byte(corpus):
  """The tokenizer is trained on runs of lines with their newlines: a newline has a piece (it used to be spelled
  as the byte <0x0A> everywhere, the trainer having seen single lines only)."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(corpus['directory'], 'tokenizer.model'))
  newline_byte = sp.piece_to_id('<0x0A>')
  assert sp.piece_to_id('\n') not in (sp.unk_id(), newline_byte)
  text = 'alpha beta\n    gamma delta\n\n        river stone\n'
  ids = sp.encode(text)
  assert sp.decode(ids) == text and newline_byte not in ids
  for role in ('train', 'validation'):
    stream = np.concatenate(preparation.read_split_tokens(corpus['directory'], corpus['index'], role))
    assert newline_byte not in stream, role  # no newline of the corpus is a byte


def test_unigram_entropy_matches_a_direct_computation(corpus):
  index, directory = corpus['index'], corpus['directory']
  train = np.concatenate(preparation.read_split_tokens(directory, index, 'train')).tolist()
  validation = np.concatenate(preparation.read_split_tokens(directory, index, 'validation')).tolist()
  vocab = index['tokenizer']['vocab_size']
  counts = collections.Counter(train)
  nats = -sum(math.log((counts[t] + 1) / (len(train) + vocab)) for t in validation) / len(validation)
  assert index['unigram_entropy'] == pytest.approx(nats, rel=1e-9)
  assert index['unigram_perplexity'] == pytest.approx(math.exp(nats))


def test_second_run_reuses_the_output(corpus, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('re-prepared although nothing changed')
  monkeypatch.setattr(preparation, '_write_prepared', fail)
  assert preparation.prepare(corpus['config'], corpus['workdir'], progress=False) == corpus['index']


def test_changed_input_rebuilds_and_a_new_tokenizer_is_refused_by_the_workdir(tmp_path):
  write_corpus(str(tmp_path / 'text'), num_files=60, num_records=0)
  config = make_config(str(tmp_path / 'text' / '*.txt'), validation_fraction=0.1)
  workdir = str(tmp_path / 'work')
  first = preparation.prepare(config, workdir, progress=False)
  with open(tmp_path / 'text' / 'doc001.txt', 'a') as f:
    f.write('\nappended text river stone')
  os.utime(tmp_path / 'text' / 'doc001.txt', ns=(1, 1))  # a different mtime whatever the clock resolution
  # Same workdir, other tokenizer options: the new tokenizer differs from the workdir's -> error naming both,
  # and the previous prepared data stays as it was.
  config.model.vocab_size = 380
  with pytest.raises(tokenizer_lib.TokenizerError) as error:
    preparation.prepare(config, workdir, progress=False)
  assert 'tokenizer.fingerprint' in str(error.value) and first['tokenizer']['fingerprint'] in str(error.value)
  assert preparation.load_index(os.path.join(workdir, 'data')) == first
  assert not glob.glob(str(tmp_path / 'work' / '.data.*'))  # no staging directory left behind
  # A fresh workdir accepts it; the changed file changed the fingerprint.
  rebuilt = preparation.prepare(config, str(tmp_path / 'other'), progress=False)
  assert rebuilt['fingerprint'] != first['fingerprint']


def test_interrupted_preparation_leaves_nothing(tmp_path, monkeypatch):
  write_corpus(str(tmp_path / 'text'), num_files=60, num_records=0)
  config = make_config(str(tmp_path / 'text' / '*.txt'), validation_fraction=0.1)

  def interrupted(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(preparation, '_write_splits', interrupted)
  with pytest.raises(KeyboardInterrupt):
    preparation.prepare(config, str(tmp_path / 'work'), progress=False)
  assert os.listdir(tmp_path / 'work') == []


@pytest.mark.parametrize('paths, message', [
    ('{tmp}/missing.txt', r'config\.data\.paths: .*missing\.txt: file does not exist'),
    ('{tmp}/*.nothing', r'config\.data\.paths: .*\*\.nothing: glob matches no file'),
    ('{tmp}/data.csv', r'config\.data\.paths: .*data\.csv: unsupported file type'),
    ('', r'config\.data\.paths: empty'),
])
def test_bad_paths(tmp_path, paths, message):
  (tmp_path / 'data.csv').write_text('a,b\n')
  with pytest.raises(sources.SourceError, match=message):
    preparation.prepare(make_config(paths.format(tmp=tmp_path)), str(tmp_path / 'work'), progress=False)
  assert not os.path.exists(tmp_path / 'work' / 'data')


def test_bad_jsonl_line_is_named(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "fine line of text here"}\n{"text": broken\n')
  with pytest.raises(sources.SourceError, match=r'bad\.jsonl:2: not valid JSON'):
    preparation.prepare(make_config(str(path)), str(tmp_path / 'work'), progress=False)
  path.write_text('{"body": "no text field"}\n')
  with pytest.raises(sources.SourceError, match=r"bad\.jsonl:1: no string field 'text'"):
    preparation.prepare(make_config(str(path)), str(tmp_path / 'work'), progress=False)


def test_empty_corpus_after_cleaning(tmp_path):
  write_corpus(str(tmp_path / 'text'), num_files=30, num_records=0)
  config = make_config(str(tmp_path / 'text' / '*.txt'), min_doc_chars=100_000)
  with pytest.raises(preparation.PrepareError, match=r'train split is empty after cleaning.*min_doc_chars'):
    preparation.prepare(config, str(tmp_path / 'work'), progress=False)
  assert os.listdir(tmp_path / 'work') == []


def test_given_tokenizer_is_used_and_missing_one_is_named(corpus, tmp_path):
  model = os.path.join(corpus['directory'], 'tokenizer.model')
  config = make_config(corpus['config'].data.paths, tokenizer_path=model, prepared_dir=str(tmp_path / 'prepared'))
  index = preparation.prepare(config, None, progress=False)
  assert index['tokenizer']['fingerprint'] == corpus['index']['tokenizer']['fingerprint']
  config.data.tokenizer_path = str(tmp_path / 'absent.model')
  with pytest.raises(preparation.PrepareError, match=r'config\.data\.tokenizer_path: .*absent\.model'):
    preparation.prepare(config, None, progress=False)


def test_clean():
  assert sources.clean('\n \n  caf\u0065\u0301\r\nx\x00y\x1b\tz \r\n\n') == '  caf\u00e9\nxy\tz'


def test_stdlib_listing_and_split():
  files = sources.stdlib_files()
  keys = [key for key, _ in files]
  assert len(keys) > 300 and all(key.endswith('.py') for key in keys)
  assert not any(part in ('test', 'tests', 'site-packages', 'idle_test') for key in keys for part in key.split(os.sep))
  assert 'os.py' in keys and os.path.join('json', 'decoder.py') in keys
  held_out = [key for key in keys if sources.role_of(key, 0.02) == 'validation']
  assert held_out == [key for key in keys if _is_validation(key)]
  assert 0.005 < len(held_out) / len(keys) < 0.05


def test_command_line(corpus, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'llm_jax.data.prepare', '--config=experiments/tiny.py', f'--workdir={tmp_path}',
       '--config.data.source=text_files', f'--config.data.paths={corpus["config"].data.paths}',
       '--config.model.vocab_size=400'], cwd=_REPO, capture_output=True, text=True, check=True)
  assert 'prepared' in result.stdout and 'unigram entropy' in result.stdout
  assert 'docs/s' in result.stderr  # the progress bar
  assert os.path.exists(tmp_path / 'tokenizer.fingerprint')
