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
from helpers import REPO, tiny_config


def run_steps(config, devices, steps=5, workdir='/tmp/unused'):
  trainer = train.Trainer(config, workdir, devices)
  state = trainer.fresh_state()
  losses, grad_norms = [], []
  for k in range(steps):
    state, m = trainer.train_step(state, trainer.put(synthetic.make_batch(config, 'train', k)))
    losses.append(float(m['loss']))
    grad_norms.append(float(m['grad_norm']))
  return np.array(losses), np.array(grad_norms), state


MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]


def test_meshes_give_the_same_losses_and_shard_parameters():
  assert len(jax.devices()) == 8, 'tests/conftest.py sets 8 fake CPU devices'
  reference, _, _ = run_steps(tiny_config(mesh=dict(data=1)), jax.devices()[:1])
  assert reference[-1] < reference[0]
  for mesh in MESHES:
    losses, _, state = run_steps(tiny_config(mesh=mesh), jax.devices())
    np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=str(mesh))
    gate = state.params['layers']['mlp']['gate']['kernel']  # logical ('layers', 'embed', 'mlp')
    fsdp = 'fsdp' if mesh['fsdp'] > 1 else None
    tensor = 'tensor' if mesh['tensor'] > 1 else None
    assert gate.sharding.spec == P(None, ('fsdp', 'context'), 'tensor'), gate.sharding.spec
    assert gate.addressable_shards[0].data.shape == (2, 32 // mesh['fsdp'], 64 // mesh['tensor'])
    q = state.params['layers']['attn']['q']['kernel']  # ('layers', 'embed', 'heads', 'head_dim')
    assert q.addressable_shards[0].data.shape == (2, 32 // mesh['fsdp'], 4 // mesh['tensor'], 8)
    mu = state.opt_state[1].mu['layers']['mlp']['gate']['kernel']  # moments shard like their parameters
    assert mu.addressable_shards[0].data.shape == gate.addressable_shards[0].data.shape
    del fsdp, tensor


def test_gradient_accumulation_equals_one_big_step():
  one, norms_one, state_one = run_steps(tiny_config(mesh=dict(data=2)), jax.devices()[:2], steps=3)
  four, norms_four, state_four = run_steps(tiny_config(mesh=dict(data=2), train=dict(grad_accum_steps=4)), jax.devices()[:2],
                               steps=3)
  np.testing.assert_allclose(four, one, rtol=1e-5)
  np.testing.assert_allclose(norms_four, norms_one, rtol=1e-5)
  # Adam divides by sqrt(v): for near-zero gradients the float32 summation order (4 microbatches vs 1 batch) is
  # magnified, up to ~1e-3 of the learning rate (1e-2 here) per step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), state_four.params,
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
  # the refused run left the workdir describing the model it holds
  assert config_lib.load_workdir_config(workdir).model.ffn_dim == 64
  with pytest.raises(ValueError, match=r'config.model.rope_theta=500000.0 but the checkpoint'):
    train.train_and_evaluate(tiny_config(train=dict(steps=4), model=dict(rope_theta=500000.0)), workdir,
                             jax.devices()[:1])


def test_sigterm_on_a_checkpoint_step_saves_once_and_stops(tmp_path, monkeypatch):
  monkeypatch.setattr(train.Preemption, 'reached', lambda self, step: step == 4)
  result = train.train_and_evaluate(tiny_config(train=dict(steps=10), checkpoint=dict(every=2)),
                                    str(tmp_path / 'run'), jax.devices()[:1])
  assert result['preempted'] and checkpoint.latest_step(str(tmp_path / 'run')) == 4


def test_weight_decay_spares_norm_scales_of_scanned_layers():
  from llm_jax import optim
  shapes = train.abstract_params(tiny_config())
  mask = {jax.tree_util.keystr(path): flag for path, flag in
          jax.tree_util.tree_leaves_with_path(optim.decay_mask(shapes))}
  assert shapes['layers']['attn_norm']['scale'].shape == (2, 32)  # stacked [L, D]: 2-D, yet a norm scale
  assert not mask["['layers']['attn_norm']['scale']"] and not mask["['final_norm']['scale']"]
  assert mask["['layers']['mlp']['gate']['kernel']"] and mask["['embed']['embedding']"]


def test_learning_rate_logged_is_the_one_applied_from_the_first_step(tmp_path):
  config = tiny_config(train=dict(steps=3, warmup_steps=2, learning_rate=1e-2, weight_decay=0.0, grad_clip=0.0))
  trainer = train.Trainer(config, str(tmp_path), jax.devices()[:1])
  state = trainer.fresh_state()
  before = jax.device_get(state.params)
  batch = trainer.put(synthetic.make_batch(config, 'train', 0))
  new_state, metrics = trainer.train_step(state, batch)
  assert float(metrics['learning_rate']) == pytest.approx(0.5e-2)  # peak / warmup at step 1, not 0
  # Adam's first update is +-1 per element (bias-corrected m/sqrt(v)), so |delta| = learning rate.
  delta = np.abs(np.asarray(new_state.params['lm_head']['kernel']) - before['lm_head']['kernel'])
  np.testing.assert_allclose(np.median(delta), 0.5e-2, rtol=1e-3)


def test_init_from_builds_sharded_optimizer_state(tmp_path):
  source = str(tmp_path / 'source')
  train.train_and_evaluate(tiny_config(train=dict(steps=2)), source, jax.devices()[:1])
  config = tiny_config(train=dict(steps=1, init_from=source), mesh=dict(data=1, fsdp=8))
  trainer = train.Trainer(config, str(tmp_path / 'fine'), jax.devices())
  manager = checkpoint.make_manager(str(tmp_path / 'fine'))
  state = train._restore_or_init(trainer, manager)
  manager.close()
  mu = state.opt_state[1].mu['layers']['mlp']['gate']['kernel']
  assert mu.sharding.spec == P(None, ('fsdp', 'context'), 'tensor') and mu.addressable_shards[0].data.shape == (2, 4, 64)
  loaded, _ = checkpoint.load_params(source, train.abstract_params(config))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(loaded))


def test_training_on_synthetic_data_never_imports_tensorflow(tmp_path):
  """The lent GPU images have no TensorFlow: the model, the loop and the synthetic source must not need it."""
  script = f'''
import sys
import jax
import llm_jax.model, llm_jax.train
assert 'tensorflow' not in sys.modules, 'importing llm_jax.train imported tensorflow'
sys.path.insert(0, {os.path.dirname(__file__)!r})
from helpers import tiny_config
llm_jax.train.train_and_evaluate(tiny_config(train=dict(steps=2)), {str(tmp_path / "run")!r}, jax.devices()[:1])
assert 'tensorflow' not in sys.modules, 'training on the synthetic source imported tensorflow'
print('no tensorflow')
'''
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and 'no tensorflow' in result.stdout, result.stderr[-3000:]


def test_resume_into_a_different_optimizer_state_names_the_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(train=dict(steps=2)), workdir, jax.devices()[:1])
  no_clipping = tiny_config(train=dict(steps=4, grad_clip=0.0))  # one optax stage fewer: another state tree
  with pytest.raises(train.IncompatibleCheckpointError, match=r'checkpoints/2 does not fit the state'):
    train.train_and_evaluate(no_clipping, workdir, jax.devices()[:1])


def test_a_custom_hook_runs_at_its_cadence_after_the_built_in_ones(tmp_path):
  """A hook added in one line sees the state after each due step, after the checkpoint of that step was saved."""
  seen, ended = [], []

  def record(loop, step):
    assert int(loop.state.step) == step
    seen.append((step, loop.manager.latest_step(), loop.last['step']))

  config = tiny_config(train=dict(steps=7), checkpoint=dict(every=3))
  result = train.train_and_evaluate(config, str(tmp_path / 'run'), jax.devices()[:1],
                                    hooks=[train.every(3, record, at_end=lambda loop: ended.append(loop.last))])
  # steps 3 and 6; the checkpoint of the step is already saved, the metrics row of the step already written
  assert seen == [(3, 3, 3), (6, 6, 6)]
  assert len(ended) == 1 and ended[0] is result and result['step'] == 7 and 'eval_loss' in result
  assert checkpoint.latest_step(str(tmp_path / 'run')) == 7


def test_z_loss_is_the_mean_squared_log_normaliser_and_enters_the_gradient(tmp_path):
  import optax
  config = tiny_config(train=dict(z_loss=0.1))
  trainer = train.Trainer(config, str(tmp_path), jax.devices()[:1])
  state = trainer.fresh_state()
  params = jax.device_get(state.params)
  batch = synthetic.make_batch(config, 'train', 0)
  logits = np.asarray(trainer.model.apply({'params': params}, batch['inputs'], batch['segment_ids'],
                                          batch['positions']), np.float64)
  # float64 by hand: log Z, cross-entropy and log(Z)^2 averaged over the target tokens
  top = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  ce = log_z - np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
  mask = np.asarray(batch['loss_mask'], np.float64)
  _, m = trainer.train_step(state, trainer.put(batch))
  np.testing.assert_allclose(float(m['loss']), (ce * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(m['z_loss']), 0.1 * (log_z ** 2 * mask).sum() / mask.sum(), rtol=1e-5)

  def reference(p):  # written independently: optax's cross-entropy plus 0.1 * logsumexp^2
    out = trainer.model.apply({'params': p}, batch['inputs'], batch['segment_ids'], batch['positions'])
    per_token = (optax.softmax_cross_entropy_with_integer_labels(out, batch['targets'])
                 + 0.1 * jax.nn.logsumexp(out, -1) ** 2)
    return (per_token * batch['loss_mask']).sum() / batch['loss_mask'].sum()

  np.testing.assert_allclose(float(m['grad_norm']), float(optax.global_norm(jax.grad(reference)(params))), rtol=1e-4)
  without, _, _ = run_steps(tiny_config(), jax.devices()[:1], steps=1)
  np.testing.assert_allclose(float(m['loss']), without[0], rtol=1e-6)  # the logged loss stays the cross-entropy
