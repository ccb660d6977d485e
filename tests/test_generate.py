"""generate: a tiny run's workdir -> completions, from Python and the command line; each bad input one message."""

import os
import shutil
import subprocess
import sys

import jax
import pytest

from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax import decoding, generate, train
from llm_jax import workdir as workdir_lib
from llm_jax.data import tokenizer as tokenizer_lib
import helpers
from helpers import REPO

CORPUS = ['the quick brown fox jumps over the lazy dog', 'def main(argv):\n  return 0',
          'a model must be used with the tokenizer it was trained with'] * 20


def write_tokenizer(path, corpus=CORPUS, vocab_size=320):
  with open(path, 'wb') as f:
    f.write(tokenizer_lib.train(corpus, vocab_size))
  return str(path)


def tiny_config(vocab_size=320, **eval_fields):
  # attention and learning_rate: get_config()'s, as this file always had them.
  return helpers.tiny_config(model=dict(vocab_size=vocab_size, max_seq_len=64, attention='auto'),
                             data=dict(seq_len=32, global_batch_size=4),
                             train=dict(steps=4, learning_rate=3e-4, warmup_steps=1, log_every=2),
                             eval={'steps': 1, **eval_fields}, checkpoint=dict(async_save=False))


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
  loaded = workdir_lib.load_workdir(workdir, devices=jax.devices()[:1])
  ids = decoding.generate(loaded.model_config, loaded.params, [loaded.tokenizer.encode(p) for p in prompts], 6,
                          eos_id=loaded.tokenizer.eos_id, vocab_limit=loaded.tokenizer.vocab_size)
  assert greedy == [loaded.tokenizer.decode([t for t in row if t != loaded.tokenizer.eos_id]) for row in ids]
  sample = lambda seed: generate.run(workdir, prompts, 6, temperature=1.0, top_k=20, seed=seed,
                                     devices=jax.devices()[:1])
  assert sample(3) == sample(3)


def _as_sft_workdir(workdir, tmp_path):
  """A copy of the workdir whose config says it fine-tuned on sft_jsonl (same weights and tokenizer)."""
  import json
  copy = str(tmp_path / 'sft')
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, 'config.json')) as f:
    saved = json.load(f)
  saved['data']['source'] = 'sft_jsonl'
  with open(os.path.join(copy, 'config.json'), 'w') as f:
    json.dump(saved, f)
  return copy


def test_sft_workdir_is_prompted_through_its_chat_template(workdir, tmp_path):
  from llm_jax import tasks
  from llm_jax.data import sft
  one = dict(devices=jax.devices()[:1])
  sft_dir = _as_sft_workdir(workdir, tmp_path)
  prompts = ['the quick', 'def main(']
  loaded = workdir_lib.load_workdir(sft_dir, **one)
  tok = loaded.tokenizer

  def expected(ids):
    rows = decoding.generate(loaded.model_config, loaded.params, ids, 6, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
    return [tok.decode([t for t in row if t != tok.eos_id]) for row in rows]

  chat_ids = [sft.encode_prompt(tok, p) for p in prompts]
  assert chat_ids[0][:len(tok.encode('<|user|>'))] == tok.encode('<|user|>')
  chat, raw = expected(chat_ids), expected([tok.encode(p) for p in prompts])
  assert chat != raw  # the template changes what the model sees
  assert generate.run(sft_dir, prompts, 6, temperature=0.0, **one) == chat  # default: follow data.source
  assert generate.run(sft_dir, prompts, 6, temperature=0.0, chat=False, **one) == raw
  assert generate.run(workdir, prompts, 6, temperature=0.0, chat=True, **one) == chat
  assert generate.run(workdir, prompts, 6, temperature=0.0, **one) == raw
  # the in-loop hook and evaluate use the same encoder
  assert tasks.prompt_encoder(loaded.config, tok)('the quick') == chat_ids[0]
  assert tasks.prompt_encoder(config_lib.load_workdir_config(workdir), tok)('the quick') == tok.encode('the quick')


def test_load_on_devices_that_do_not_divide_the_run_batch(workdir):
  """The run's batch (4) does not divide over the 8 devices here: loading to generate still works."""
  assert len(jax.devices()) == 8
  loaded = workdir_lib.load_workdir(workdir)  # all 8 devices
  assert loaded.config.data.global_batch_size == 8 and loaded.config.train.grad_accum_steps == 1
  assert generate.run(workdir, ['the quick'], 4, temperature=0.0) == generate.run(
      workdir, ['the quick'], 4, temperature=0.0, devices=jax.devices()[:1])
  config = config_lib.load_workdir_config(workdir)
  config.data.global_batch_size, config.train.grad_accum_steps = 12, 3
  config.mesh.update(data=2, fsdp=4, tensor=1)
  config.eval.task_file = '/moved/away/tasks.jsonl'
  fitted = workdir_lib.inference_config(config, 8)  # mesh fits; 12 -> largest multiple of 8 below it
  assert (fitted.data.global_batch_size, fitted.mesh.data, fitted.mesh.fsdp) == (8, 2, 4)
  assert fitted.eval.task_file == ''
  fitted = workdir_lib.inference_config(config, 3)  # mesh does not fit: replicated, batch split over 3
  assert (fitted.data.global_batch_size, fitted.mesh.data, fitted.mesh.fsdp) == (12, -1, 1)
  validation.validate(fitted, 3)
  assert config.data.global_batch_size == 12  # the run's config is not changed


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
