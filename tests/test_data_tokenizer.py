"""Tokenizer: reserved ids, lossless round trip, fingerprint, vocab check, binding to a workdir; no TensorFlow."""

import hashlib
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from llm_jax.data import tokenizer as tokenizer_lib

_WORDS = ('def', 'return', 'self', 'value', 'import', 'class', 'for', 'in', 'range', 'print', 'if', 'else',
          'None', 'True', 'data', 'result', 'name', 'index', 'items', 'append')


def sample_lines(count=3000, seed=0):
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(count):
    indent = '    ' * int(rng.integers(3))
    words = rng.choice(_WORDS, size=int(rng.integers(2, 9)))
    lines.append(indent + ' '.join(words) + rng.choice(['', ':', '()', ' = 1', '  # note']))
  return lines


@pytest.fixture(scope='module')
def model_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'sp.model'
  path.write_bytes(tokenizer_lib.train(sample_lines(), vocab_size=400, num_threads=2))
  return str(path)


def test_reserved_ids_and_round_trip(model_path):
  tok = tokenizer_lib.load(model_path)
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert 300 < tok.vocab_size <= 400
  text = 'def f(x):\n\tif x:\n        return "héllo ✓ 𝔘"  \n\n# ünïcode 日本語 never seen in training'
  ids = tok.encode(text)
  assert all(i >= 4 for i in ids)  # no pad/eos/bos/unk: unseen characters fall back to bytes
  assert tok.decode(ids) == text
  assert tok.decode(ids + [tok.eos_id]) == text
  assert tok.encode_batch([text, 'self.value'], num_threads=2) == [ids, tok.encode('self.value')]
  assert len(tok.encode('    return value')) < len('    return value') / 2  # learned pieces, indentation included


def test_fingerprint_is_sha256_of_file(model_path):
  with open(model_path, 'rb') as f:
    assert tokenizer_lib.load(model_path).fingerprint == hashlib.sha256(f.read()).hexdigest()
  assert tokenizer_lib.file_fingerprint(model_path) == tokenizer_lib.load(model_path).fingerprint


def test_training_is_reproducible(model_path):
  again = tokenizer_lib.train(sample_lines(), vocab_size=400, num_threads=2)
  assert hashlib.sha256(again).hexdigest() == tokenizer_lib.load(model_path).fingerprint


def test_too_small_vocab_names_the_field():
  with pytest.raises(tokenizer_lib.TokenizerError, match=r'config\.model\.vocab_size: 100 is too small'):
    tokenizer_lib.train(sample_lines(100), vocab_size=100)


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError, match='nothing.model'):
    tokenizer_lib.load(str(tmp_path / 'nothing.model'))
  junk = tmp_path / 'junk.model'
  junk.write_bytes(b'not a model')
  with pytest.raises(tokenizer_lib.TokenizerError, match='junk.model: not a SentencePiece model'):
    tokenizer_lib.load(str(junk))


def test_check_vocab(model_path):
  tok = tokenizer_lib.load(model_path)
  config = ml_collections.ConfigDict({'model': {'vocab_size': tok.vocab_size}})
  tokenizer_lib.check_vocab(config, tok)
  config.model.vocab_size = tok.vocab_size + 64  # padding the embedding is allowed
  tokenizer_lib.check_vocab(config, tok)
  config.model.vocab_size = tok.vocab_size - 1
  with pytest.raises(tokenizer_lib.TokenizerError, match=r'config\.model\.vocab_size'):
    tokenizer_lib.check_vocab(config, tok)


def test_bind_to_workdir(model_path, tmp_path):
  workdir = str(tmp_path / 'run')
  tok = tokenizer_lib.bind_to_workdir(model_path, workdir)
  assert tokenizer_lib.load_from_workdir(workdir).fingerprint == tok.fingerprint
  with open(os.path.join(workdir, 'tokenizer.fingerprint')) as f:
    assert f.read().strip() == tok.fingerprint
  tokenizer_lib.bind_to_workdir(model_path, workdir)  # the same tokenizer again is fine
  other = tmp_path / 'other.model'
  other.write_bytes(tokenizer_lib.train(sample_lines(seed=1), vocab_size=380, num_threads=2))
  with pytest.raises(tokenizer_lib.TokenizerError) as error:
    tokenizer_lib.bind_to_workdir(str(other), workdir)
  message = str(error.value)
  assert 'other.model' in message and 'tokenizer.fingerprint' in message and tok.fingerprint in message
  assert tokenizer_lib.load_from_workdir(workdir).fingerprint == tok.fingerprint  # untouched


def test_no_tensorflow_for_synthetic_data_and_tokenizer():
  code = ('import sys, llm_jax.data, llm_jax.data.synthetic, llm_jax.data.tokenizer; '
          'assert "tensorflow" not in sys.modules, "tensorflow was imported"')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
