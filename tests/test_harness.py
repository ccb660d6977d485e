"""lm-evaluation-harness backend: the same checkpoint scored by lm_eval's own `hf` backend (after convert to_hf)
and by `llm_jax`, on local task YAMLs over local JSON data (float32): the same multiple-choice accuracies, the
same rolling log-likelihoods (1e-4 relative), the same generations. Also the CLI and the import boundary."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from llm_jax import convert, train
from llm_jax.data import synthetic
from llm_jax.data import tokenizer as tokenizer_lib
from test_generate import CORPUS, REPO, tiny_config, write_tokenizer

pytest.importorskip('lm_eval')
pytest.importorskip('transformers')

QUESTIONS = [('the quick brown', [' fox', ' dog', ' model'], 0), ('def main(', ['argv):', 'self):', 'x'], 0),
             ('a model must be', [' used', ' trained', ' lazy'], 1), ('the lazy', [' dog', ' fox', ' cat'], 0),
             ('return', [' 0', ' 1', ' None'], 2)]
TEXTS = ['the quick brown fox jumps over the lazy dog ' * 6,  # longer than max_seq_len: several rolling windows
         'def main(argv):\n  return 0', 'a model must be used with the tokenizer it was trained with']
PROMPTS = ['the quick brown', 'def main(', 'a model', 'the tokenizer it was']

TASKS = {
    'mc_local': """task: mc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    'ppl_local': """task: ppl_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    'gen_local': """task: gen_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{prompt}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(directory):
  os.makedirs(directory, exist_ok=True)
  rows = {'mc': [dict(question=q, choices=c, answer=a) for q, c, a in QUESTIONS],
          'ppl': [dict(text=t) for t in TEXTS], 'gen': [dict(prompt=p) for p in PROMPTS]}
  for name, records in rows.items():
    with open(os.path.join(directory, f'{name}.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)
  for name, text in TASKS.items():
    with open(os.path.join(directory, f'{name}.yaml'), 'w') as f:
      f.write(text.format(dir=directory))
  return directory


def corpus_workdir(root, steps=60):
  """A tiny run that learnt the test corpus: the synthetic source's batches are windows of the corpus' tokens
  (so greedy decoding writes the corpus' pieces, not random bytes), without any data preparation."""
  workdir = os.path.join(root, 'run')
  tokenizer = tokenizer_lib.bind_to_workdir(write_tokenizer(os.path.join(root, 'tok.model')), workdir)
  tokens = np.array([t for doc in CORPUS for t in tokenizer.encode(doc) + [tokenizer.eos_id]], np.int32)

  def corpus_batch(config, split, step, process_index=0, process_count=1):
    rows, width = config.data.global_batch_size // process_count, config.data.seq_len
    starts = np.random.default_rng([step, process_index]).integers(0, len(tokens) - width - 1, rows)
    window = np.stack([tokens[s:s + width + 1] for s in starts])
    return dict(inputs=window[:, :-1], targets=window[:, 1:], segment_ids=np.ones((rows, width), np.int32),
                positions=np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)).copy(),
                loss_mask=np.ones((rows, width), np.float32))

  config = tiny_config()
  config.train.update(steps=steps, learning_rate=1e-2, warmup_steps=5, log_every=steps)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(synthetic, 'make_batch', corpus_batch)
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return workdir


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('harness'))
  workdir = corpus_workdir(root)
  hf_dir = os.path.join(root, 'hf')
  convert.to_hf(workdir, hf_dir)
  return workdir, hf_dir, write_tasks(os.path.join(root, 'tasks'))


def _samples(output, task):
  return sorted(output['samples'][task], key=lambda s: s['doc_id'])


def test_llm_jax_and_hf_backends_agree(setup):
  import lm_eval
  from lm_eval.tasks import TaskManager
  from llm_jax import harness
  workdir, hf_dir, tasks_dir = setup
  names = ['mc_local', 'ppl_local', 'gen_local']
  ours = harness.evaluate(harness.LlmJaxLM(workdir=workdir, batch_size=4, devices=jax.devices()[:2]), names,
                          include_path=tasks_dir, log_samples=True)
  lm = harness.LlmJaxLM(workdir=workdir, devices=jax.devices()[:1])
  theirs = lm_eval.simple_evaluate(
      model='hf', model_args=dict(pretrained=hf_dir, dtype='float32', device='cpu', max_length=lm.max_length,
                                  prefix_token_id=lm.eot_token_id),  # llm_jax conditions on EOS, its doc boundary
      tasks=names, task_manager=TaskManager(include_path=tasks_dir), batch_size=4, log_samples=True,
      bootstrap_iters=0)
  for metric in ('acc,none', 'acc_norm,none'):
    assert ours['results']['mc_local'][metric] == theirs['results']['mc_local'][metric]
  # the multiple-choice log-likelihoods themselves, request by request
  mc = lambda out: np.array([[float(r[0]) for r in s['filtered_resps']] for s in _samples(out, 'mc_local')])
  np.testing.assert_allclose(mc(ours), mc(theirs), rtol=1e-4)
  rolling = lambda out: np.array([float(np.ravel(s['filtered_resps'])[0]) for s in _samples(out, 'ppl_local')])
  np.testing.assert_allclose(rolling(ours), rolling(theirs), rtol=1e-4)
  assert np.all(rolling(ours) < 0)
  generations = lambda out: [s['filtered_resps'][0] for s in _samples(out, 'gen_local')]
  assert generations(ours) == generations(theirs), (generations(ours), generations(theirs))
  assert any(generations(ours))
  for metric in ('word_perplexity,none', 'bits_per_byte,none'):
    assert ours['results']['ppl_local'][metric] == pytest.approx(theirs['results']['ppl_local'][metric], rel=1e-4)


def test_cli_prints_the_results_and_importing_train_needs_no_lm_eval(setup, tmp_path):
  workdir, _, tasks_dir = setup
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p]),
             XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  out = tmp_path / 'out.json'
  run = subprocess.run([sys.executable, '-m', 'llm_jax.harness', f'--workdir={workdir}', '--tasks=mc_local',
                        f'--include_path={tasks_dir}', '--limit=3', '--batch_size=2', f'--output_path={out}'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  results = json.loads(run.stdout[run.stdout.index('{'):])
  assert 0.0 <= results['mc_local']['acc,none'] <= 1.0
  assert json.loads(out.read_text())['results']['mc_local']['acc,none'] == results['mc_local']['acc,none']
  bad = subprocess.run([sys.executable, '-m', 'llm_jax.harness', f'--workdir={workdir}', '--tasks=no_such_task',
                        f'--include_path={tasks_dir}'], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode == 1 and 'unknown task(s) no_such_task' in bad.stderr, bad.stderr[-2000:]
  probe = subprocess.run([sys.executable, '-c', 'import sys, llm_jax.train, llm_jax.workdir, llm_jax.evaluate; '
                          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("lm_eval", "wandb")))'],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert probe.returncode == 0 and probe.stdout.strip() == '[]', probe.stdout + probe.stderr[-2000:]


def test_training_loop_scores_harness_tasks_at_each_evaluation(setup, tmp_path):
  """eval.harness_tasks in the loop: a row of harness/<task>/<metric> at the end of the run, equal to scoring the
  final checkpoint afterwards."""
  import shutil
  from llm_jax import config as config_lib
  from llm_jax import harness
  workdir, _, tasks_dir = setup
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  config = config_lib.load_workdir_config(copy)
  config.train.steps += 1  # resume: one more step, then the end-of-run evaluation with the harness
  config.eval.update(harness_tasks='mc_local', harness_include_path=tasks_dir, harness_limit=3)
  result = train.train_and_evaluate(config, copy, jax.devices()[:1])
  with open(os.path.join(copy, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  (row,) = [r for r in rows if 'harness/mc_local/acc' in r]
  assert row['step'] == result['step'] == config.train.steps
  after = harness.evaluate(harness.LlmJaxLM(workdir=copy, devices=jax.devices()[:1]), ['mc_local'], tasks_dir, limit=3)
  assert row['harness/mc_local/acc'] == after['results']['mc_local']['acc,none']
