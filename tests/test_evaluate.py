"""evaluate: perplexity and bits per byte against an independent computation, BLEU/ROUGE against the libraries,
task scoring from the CLI and in the training loop, and one-message errors."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import sacrebleu
import sentencepiece as spm
from rouge_score import rouge_scorer

from llm_jax import config as config_lib
from llm_jax import evaluate, text_metrics
from llm_jax import workdir as workdir_lib
from llm_jax.data import synthetic
from llm_jax.model import Transformer
from test_generate import REPO, trained_workdir

ONE = dict(devices=jax.devices()[:1])
TASKS = [dict(prompt='the quick brown', reference='fox jumps over the lazy dog'),
         dict(prompt='def main(', reference='argv):\n  return 0'),
         dict(prompt='a model must', reference='be used with the tokenizer it was trained with')]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A 4-step run that scores a task file in the loop (eval.every=2 and at the end)."""
  root = str(tmp_path_factory.mktemp('evaluate'))
  task_file = os.path.join(root, 'tasks.jsonl')
  with open(task_file, 'w') as f:
    f.writelines(json.dumps(t) + '\n' for t in TASKS)
  workdir = trained_workdir(root, every=2, task_file=task_file, max_new_tokens=4, log_samples=2)
  return workdir, task_file


# --- metrics against the libraries -----------------------------------------------------------------------------

HYPOTHESES = ['the cat sat on the mat', 'a quick brown fox', 'nothing in common', '']
REFERENCES = ['the cat is on the mat', 'the quick brown fox jumps', 'entirely different words', 'empty hypothesis']


def test_bleu_and_rouge_agree_with_the_libraries():
  assert text_metrics.bleu(HYPOTHESES, REFERENCES) == pytest.approx(
      sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
  assert text_metrics.bleu(['the cat sat on the mat'], ['the cat sat on the mat']) == pytest.approx(100.0)
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'])
  by_hand = [scorer.score(r, h) for h, r in zip(HYPOTHESES, REFERENCES)]
  got = text_metrics.rouge(HYPOTHESES, REFERENCES)
  for name in ('rouge1', 'rouge2', 'rougeL'):
    assert got[name] == pytest.approx(100 * np.mean([s[name].fmeasure for s in by_hand]))
  # 'the cat sat on the mat' vs 'the cat is on the mat': 5 of 6 unigrams shared -> F1 = 5/6.
  assert text_metrics.rouge(HYPOTHESES[:1], REFERENCES[:1])['rouge1'] == pytest.approx(100 * 5 / 6)
  with pytest.raises(ValueError, match='2 hypotheses but 1 references'):
    text_metrics.bleu(['a', 'b'], ['a'])


def test_task_file_errors_name_file_and_line(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "a", "reference": "b"}\n\n{"prompt": "a"}\n')
  with pytest.raises(text_metrics.TaskFileError, match=r'bad.jsonl:3: field "reference" must be a string'):
    text_metrics.read_tasks(str(bad))
  bad.write_text('{"prompt": "a", "reference": "b"}\nnot json\n')
  with pytest.raises(text_metrics.TaskFileError, match=r'bad.jsonl:2: not valid JSON'):
    text_metrics.read_tasks(str(bad))
  with pytest.raises(text_metrics.TaskFileError, match='cannot read it'):
    text_metrics.read_tasks(str(tmp_path / 'missing.jsonl'))


# --- a trained workdir -----------------------------------------------------------------------------------------

def _independent_bytes(model_path, targets, mask):
  """UTF-8 bytes the scored targets spell, from the pieces (byte pieces <0xNN> are 1 byte, control/unknown 0)."""
  sp = spm.SentencePieceProcessor(model_file=model_path)
  total = 0
  for token in targets[mask > 0]:
    piece = sp.id_to_piece(int(token))
    if sp.is_control(int(token)) or sp.is_unknown(int(token)):
      continue
    total += 1 if sp.is_byte(int(token)) else len(piece.replace('\u2581', ' ').encode('utf-8'))
  return total


def test_perplexity_and_bits_per_byte_match_an_independent_computation(run_dir):
  workdir, _ = run_dir
  result = evaluate.run(workdir, {'eval.steps': 1}, split='validation', task_file='', **ONE)
  ppl = result['perplexity']
  # independent: the model's logits, a float64 log-softmax in numpy, the raw synthetic batch 0
  config = config_lib.load_workdir_config(workdir)
  batch = synthetic.make_batch(config, 'validation', 0)
  loaded = workdir_lib.load_workdir(workdir, **ONE)
  logits = np.asarray(Transformer(loaded.model_config).apply({'params': loaded.params}, batch['inputs'],
                                                             batch['segment_ids'], batch['positions']), np.float64)
  log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  picked = -np.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
  total = float(np.sum(picked * batch['loss_mask']))
  assert ppl['tokens'] == int(batch['loss_mask'].sum())
  assert ppl['loss'] == pytest.approx(total / ppl['tokens'], rel=1e-5)
  assert ppl['perplexity'] == pytest.approx(math.exp(ppl['loss']), rel=1e-9)
  model_path = os.path.join(workdir, 'tokenizer.model')
  n_bytes = sum(_independent_bytes(model_path, t, m) for t, m in zip(batch['targets'], batch['loss_mask']))
  assert ppl['bytes'] == n_bytes
  assert ppl['bits_per_byte'] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)
  with open(result['output']) as f:
    assert json.load(f)['perplexity'] == pytest.approx(ppl)


def test_bits_per_byte_counts_the_bytes_of_every_process(run_dir, monkeypatch):
  """With P processes the loss sum is global (the eval step sums the global batch) but each process reads only
  its rows: the byte count must be summed over processes. Two processes with the same rows are simulated."""
  from jax.experimental import multihost_utils
  workdir, _ = run_dir
  loaded = workdir_lib.load_workdir(workdir, **ONE)
  one = evaluate.perplexity(loaded, 'validation', 1)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', lambda x: np.stack([np.asarray(x)] * 2))
  two = evaluate.perplexity(loaded, 'validation', 1)
  assert two['bytes'] == 2 * one['bytes']
  assert two['bits_per_byte'] == pytest.approx(one['bits_per_byte'] / 2)


def test_token_byte_lengths_spell_the_text(run_dir):
  tokenizer = workdir_lib.load_workdir(run_dir[0], **ONE).tokenizer
  text = 'the quick  brown fox\n\tdef main(): héllo wörld — ✓ 日本'  # byte fallback for the rare characters
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert int(evaluate.token_byte_lengths(tokenizer)[ids].sum()) == len(text.encode('utf-8'))


def test_cli_scores_a_task_file(run_dir):
  workdir, task_file = run_dir
  result = subprocess.run([sys.executable, '-m', 'llm_jax.evaluate', f'--workdir={workdir}', f'--task_file={task_file}',
                           '--config.eval.steps=1', '--config.eval.log_samples=3', '--split=test'],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, XLA_FLAGS=''))
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout)
  assert printed['split'] == 'test' and printed['step'] == 4
  tasks = printed['tasks']
  assert tasks['examples'] == 3 and len(tasks['samples']) == 3
  hypotheses = [s['completion'] for s in tasks['samples']]
  references = [t['reference'] for t in TASKS]
  assert tasks['bleu'] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
  with open(os.path.join(workdir, 'eval', 'step_4_test.json')) as f:
    assert json.load(f)['tasks']['rougeL'] == tasks['rougeL']


def test_training_loop_logs_task_scores_and_samples(run_dir):
  workdir, _ = run_dir
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  task_rows = [row for row in rows if 'task_bleu' in row]
  assert [row['step'] for row in task_rows] == [2, 4]
  for row in task_rows:
    assert row['task_examples'] == 3 and 0 <= row['task_rouge1'] <= 100
    assert [s['prompt'] for s in row['task_samples']] == [t['prompt'] for t in TASKS[:2]]


def test_errors_are_one_message(run_dir, tmp_path):
  workdir, _ = run_dir
  with pytest.raises(config_lib.ConfigError, match='config.model.d_model: cannot change'):
    evaluate.run(workdir, {'model.d_model': 64}, **ONE)
  with pytest.raises(FileNotFoundError, match='no such directory'):
    evaluate.run(str(tmp_path / 'nowhere'), **ONE)
  with pytest.raises(FileNotFoundError, match='--task_file .*: no such file'):
    evaluate.run(workdir, task_file=str(tmp_path / 'missing.jsonl'), **ONE)
  result = subprocess.run([sys.executable, '-m', 'llm_jax.evaluate', f'--workdir={tmp_path}'],
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 1 and 'config.json: missing' in result.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in result.stderr
