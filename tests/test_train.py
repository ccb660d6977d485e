"""Training: mesh equivalence, real sharding, gradient accumulation, exact resume, SIGTERM, non-finite stops."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax import train
from llm_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**sections):
  c = config_lib.get_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=32,
                 dtype='float32', attention='xla')
  c.data.update(source='synthetic', seq_len=16, global_batch_size=8)
  c.train.update(steps=5, learning_rate=1e-2, warmup_steps=2, log_every=1)
  c.eval.update(every=0, steps=2)
  c.checkpoint.update(every=0, keep=3)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  for section, values in sections.items():
    c[section].update(values)
  return c


def run_steps(config, devices, steps=5, workdir='/tmp/unused'):
  trainer = train.Trainer(config, workdir, devices)
  state = trainer.fresh_state()
  losses = []
  for k in range(steps):
    state, m = trainer.train_step(state, trainer.put(synthetic.make_batch(config, 'train', k)))
    losses.append(float(m['loss']))
  return np.array(losses), state


MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]


def test_meshes_give_the_same_losses_and_shard_parameters():
  assert len(jax.devices()) == 8, 'tests/conftest.py sets 8 fake CPU devices'
  reference, _ = run_steps(tiny_config(mesh=dict(data=1)), jax.devices()[:1])
  assert reference[-1] < reference[0]
  for mesh in MESHES:
    losses, state = run_steps(tiny_config(mesh=mesh), jax.devices())
    np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=str(mesh))
    gate = state.params['layers']['mlp']['gate']['kernel']  # logical ('layers', 'embed', 'mlp')
    fsdp = 'fsdp' if mesh['fsdp'] > 1 else None
    tensor = 'tensor' if mesh['tensor'] > 1 else None
    assert gate.sharding.spec == P(None, 'fsdp', 'tensor'), gate.sharding.spec
    assert gate.addressable_shards[0].data.shape == (2, 32 // mesh['fsdp'], 64 // mesh['tensor'])
    q = state.params['layers']['attn']['q']['kernel']  # ('layers', 'embed', 'heads', 'head_dim')
    assert q.addressable_shards[0].data.shape == (2, 32 // mesh['fsdp'], 4 // mesh['tensor'], 8)
    mu = state.opt_state[1].mu['layers']['mlp']['gate']['kernel']  # moments shard like their parameters
    assert mu.addressable_shards[0].data.shape == gate.addressable_shards[0].data.shape
    del fsdp, tensor


def test_gradient_accumulation_equals_one_big_step():
  one, state_one = run_steps(tiny_config(mesh=dict(data=2)), jax.devices()[:2], steps=3)
  four, state_four = run_steps(tiny_config(mesh=dict(data=2), train=dict(grad_accum_steps=4)), jax.devices()[:2],
                               steps=3)
  np.testing.assert_allclose(four, one, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state_four.params,
               state_one.params)


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _train_rows(workdir):
  return {r['step']: r for r in _rows(workdir) if 'loss' in r}


def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
  config = tiny_config(train=dict(steps=20), checkpoint=dict(every=5), eval=dict(every=10))
  devices = jax.devices()[:1]
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight, devices)

  # Interrupt the second run after 12 steps through the same path SIGTERM takes.
  interrupted = str(tmp_path / 'interrupted')
  calls = {'n': 0}

  def preempt_at_12(self, step):
    calls['n'] += 1
    return calls['n'] == 12

  with monkeypatch.context() as m:
    m.setattr(train.Preemption, "reached", preempt_at_12)
    result = train.train_and_evaluate(config, interrupted, devices)
  assert result['preempted'] and checkpoint.latest_step(interrupted) == 12
  train.train_and_evaluate(config, interrupted, devices)

  a, b = _train_rows(straight), _train_rows(interrupted)
  assert sorted(a) == list(range(1, 21)) and sorted(b) == list(range(1, 21))
  for step in range(13, 21):
    for key in ('loss', 'grad_norm', 'learning_rate', 'param_norm'):
      assert a[step][key] == b[step][key], (step, key)
  for row in a.values():
    assert {'step', 'loss', 'learning_rate', 'grad_norm', 'tokens_per_s', 'mfu'} <= set(row)
  evals = [r for r in _rows(straight) if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [10, 20]
  assert all(np.isclose(r['eval_perplexity'], np.exp(r['eval_loss'])) for r in evals)
  assert evals[-1]['eval_loss'] < evals[0]['eval_loss']
  assert os.listdir(os.path.join(straight, 'tensorboard'))
  saved = json.load(open(os.path.join(straight, 'config.json')))
  assert saved['model']['d_model'] == 32 and saved['train']['steps'] == 20


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  overrides = ['--config.data.source=synthetic', '--config.model.vocab_size=64', '--config.model.d_model=32',
               '--config.model.num_layers=1', '--config.model.ffn_dim=64', '--config.data.seq_len=16',
               '--config.data.global_batch_size=4', '--config.train.log_every=1', '--config.eval.every=0',
               '--config.checkpoint.every=0']
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'llm_jax.main', f'--config={REPO}/experiments/tiny.py', f'--workdir={workdir}',
         '--config.train.steps=100000'] + overrides
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_file = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics_file) and len(_rows(workdir)) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output
  saved = checkpoint.latest_step(workdir)
  assert saved is not None and saved >= 3, output

  resume = subprocess.run(cmd[:-1 - len(overrides)] + [f'--config.train.steps={saved + 2}'] + overrides, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180)
  assert resume.returncode == 0, resume.stdout + resume.stderr
  assert f'resuming from {checkpoint.checkpoint_dir(workdir)}/{saved}' in resume.stdout
  assert checkpoint.latest_step(workdir) == saved + 2


@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_nonfinite_loss_stops_naming_the_step(tmp_path, policy):
  config = tiny_config(model=dict(init_std=float('inf')), train=dict(steps=10, nonfinite=policy,
                                                                      max_nonfinite_skips=2))
  expected = r'at step 1 \(train batch 0\):' if policy == 'stop' else r'at step 3: 3 updates in a row were skipped'
  with pytest.raises(train.NonFiniteError, match=expected):
    train.train_and_evaluate(config, str(tmp_path / policy), jax.devices()[:1])


def test_resume_with_a_different_model_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(train=dict(steps=2)), workdir, jax.devices()[:1])
  with pytest.raises(ValueError, match=r'config.model.ffn_dim=96 but the checkpoint'):
    train.train_and_evaluate(tiny_config(train=dict(steps=4), model=dict(ffn_dim=96)), workdir, jax.devices()[:1])


def test_training_on_synthetic_data_never_imports_tensorflow(tmp_path):
  """The lent GPU images have no TensorFlow: the model, the loop and the synthetic source must not need it."""
  script = f'''
import sys
import jax
import llm_jax.model, llm_jax.train
assert 'tensorflow' not in sys.modules, 'importing llm_jax.train imported tensorflow'
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_train import tiny_config
llm_jax.train.train_and_evaluate(tiny_config(train=dict(steps=2)), {str(tmp_path / "run")!r}, jax.devices()[:1])
assert 'tensorflow' not in sys.modules, 'training on the synthetic source imported tensorflow'
print('no tensorflow')
'''
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and 'no tensorflow' in result.stdout, result.stderr[-3000:]
