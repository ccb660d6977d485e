"""generate: a tiny run's workdir -> completions, from Python and the command line; each bad input one message."""

import os
import shutil
import subprocess
import sys

import jax
import pytest

from llm_jax import config as config_lib
from llm_jax import decoding, generate, train
from llm_jax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ['the quick brown fox jumps over the lazy dog', 'def main(argv):\n  return 0',
          'a model must be used with the tokenizer it was trained with'] * 20


def write_tokenizer(path, corpus=CORPUS, vocab_size=320):
  with open(path, 'wb') as f:
    f.write(tokenizer_lib.train(corpus, vocab_size))
  return str(path)


def tiny_config(vocab_size=320, **eval_fields):
  c = config_lib.get_config()
  c.model.update(vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                 max_seq_len=64, dtype='float32')
  c.data.update(source='synthetic', seq_len=32, global_batch_size=4)
  c.train.update(steps=4, warmup_steps=1, log_every=2)
  c.eval.update(dict(dict(every=0, steps=1), **eval_fields))
  c.checkpoint.update(every=0, async_save=False)
  return c


def trained_workdir(root, **eval_fields):
  """A 4-step synthetic run whose workdir holds a tokenizer (bound before training, so the checkpoint records
  its fingerprint)."""
  workdir = os.path.join(root, 'run')
  tokenizer_lib.bind_to_workdir(write_tokenizer(os.path.join(root, 'tok.model')), workdir)
  train.train_and_evaluate(tiny_config(**eval_fields), workdir, devices=jax.devices()[:1])
  return workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return trained_workdir(str(tmp_path_factory.mktemp('generate')))


def test_run_completes_prompts_reproducibly(workdir):
  prompts = ['the quick', 'def main(argv):\n  ']
  greedy = generate.run(workdir, prompts, max_new_tokens=6, temperature=0.0, devices=jax.devices()[:1])
  assert len(greedy) == 2 and all(isinstance(text, str) for text in greedy)
  # The same as decoding the checkpoint directly; the seed fixes sampled text.
  loaded = decoding.load_workdir(workdir, devices=jax.devices()[:1])
  ids = decoding.generate(loaded.model_config, loaded.params, [loaded.tokenizer.encode(p) for p in prompts], 6,
                          eos_id=loaded.tokenizer.eos_id, vocab_limit=loaded.tokenizer.vocab_size)
  assert greedy == [loaded.tokenizer.decode([t for t in row if t != loaded.tokenizer.eos_id]) for row in ids]
  sample = lambda seed: generate.run(workdir, prompts, 6, temperature=1.0, top_k=20, seed=seed,
                                     devices=jax.devices()[:1])
  assert sample(3) == sample(3)


def test_cli_prints_completions(workdir, tmp_path):
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text('the lazy dog\n\ndef main(\n')
  result = subprocess.run([sys.executable, '-m', 'llm_jax.generate', f'--workdir={workdir}', '--prompt=a model',
                           f'--prompts_file={prompts_file}', '--max_new_tokens=4', '--temperature=0'],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, XLA_FLAGS=''))
  assert result.returncode == 0, result.stderr[-2000:]
  assert [line for line in result.stdout.splitlines() if line.startswith('=== prompt')] == [
      '=== prompt 0 ===', '=== prompt 1 ===', '=== prompt 2 ===']
  assert 'the lazy dog' in result.stdout


def test_errors_are_one_message(workdir, tmp_path):
  one = dict(devices=jax.devices()[:1])
  with pytest.raises(decoding.PromptError, match='prompt 1 is empty'):
    generate.run(workdir, ['ok', ''], **one)
  with pytest.raises(decoding.PromptError, match=r'prompt 0 has \d+ tokens; model.max_seq_len=64'):
    generate.run(workdir, ['the quick brown fox ' * 20], **one)
  with pytest.raises(FileNotFoundError, match='no such directory'):
    generate.run(str(tmp_path / 'nowhere'), ['x'], **one)
  empty = tmp_path / 'empty'
  empty.mkdir()
  shutil.copy(os.path.join(workdir, 'config.json'), empty / 'config.json')
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    generate.run(str(empty), ['x'], **one)
  other = write_tokenizer(tmp_path / 'other.model', corpus=['entirely different text, other pieces'] * 30)
  with pytest.raises(tokenizer_lib.TokenizerError, match='tokenizer mismatch'):
    generate.run(workdir, ['x'], tokenizer_path=other, **one)
  # the command line prints the message, not a traceback
  result = subprocess.run([sys.executable, '-m', 'llm_jax.generate', f'--workdir={tmp_path / "nowhere"}',
                           '--prompt=x'], capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith('error: --workdir')
  assert 'Traceback' not in result.stderr
