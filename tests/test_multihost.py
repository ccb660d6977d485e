"""Scale-out and reliability on CPU: two processes with gloo collectives, elastic resume onto fewer devices,
SIGTERM on one process, SIGKILL during an async save, unwritable workdirs and failed saves."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llm_jax import checkpoint
from llm_jax import train
from helpers import REPO, tiny_config
SMALL_RUN = ['--config.data.source=synthetic', '--config.model.vocab_size=64', '--config.model.d_model=32',
             '--config.model.num_layers=2', '--config.model.ffn_dim=64', '--config.data.seq_len=16',
             '--config.data.global_batch_size=8', '--config.train.log_every=1', '--config.eval.every=0',
             '--config.mesh.data=1', '--config.mesh.fsdp=8']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))


def _main_cmd(workdir, *extra):
  return [sys.executable, '-m', 'llm_jax.main', f'--config={REPO}/experiments/tiny.py', f'--workdir={workdir}',
          *SMALL_RUN, *extra]


def _start_two_processes(workdir, *extra):
  port = _free_port()
  return [subprocess.Popen(_main_cmd(workdir, *extra, f'--coordinator_address=localhost:{port}',
                                     '--num_processes=2', f'--process_id={i}'),
                           cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]


def _train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  procs = _start_two_processes(tmp_path / 'two', '--config.train.steps=10', '--config.checkpoint.every=5')
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  one = subprocess.run(_main_cmd(tmp_path / 'one', '--config.train.steps=10'), cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  two_losses, one_losses = _train_losses(tmp_path / 'two'), _train_losses(tmp_path / 'one')
  assert sorted(two_losses) == list(range(1, 11))
  np.testing.assert_allclose([two_losses[s] for s in range(1, 11)], [one_losses[s] for s in range(1, 11)],
                             rtol=1e-5)
  assert checkpoint.latest_step(str(tmp_path / 'two')) == 10  # both processes wrote one checkpoint together


@pytest.mark.slow
def test_sigterm_on_one_process_saves_the_same_step_on_all(tmp_path):
  workdir = tmp_path / 'run'
  procs = _start_two_processes(workdir, '--config.train.steps=100000', '--config.checkpoint.every=0')
  deadline = time.time() + 180
  while time.time() < deadline:
    if os.path.exists(workdir / 'metrics.jsonl') and len(_train_losses(workdir)) >= 3:
      break
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # only process 1 is preempted
  outputs = [p.communicate(timeout=180)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  saved = checkpoint.latest_step(str(workdir))
  assert saved is not None
  for output in outputs:
    assert f'SIGTERM: saved step {saved} ' in output


def _preempt_at(step_to_stop):
  def reached(self, step):
    return step == step_to_stop
  return reached


@pytest.mark.parametrize('devices', [4, 1])
def test_checkpoint_from_8_devices_resumes_on_fewer(tmp_path, monkeypatch, devices):
  config = tiny_config(train=dict(steps=10), mesh=dict(data=1, fsdp=8))
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight, jax.devices())
  elastic = str(tmp_path / 'elastic')
  with monkeypatch.context() as m:
    m.setattr(train.Preemption, 'reached', _preempt_at(5))
    train.train_and_evaluate(config, elastic, jax.devices())
  assert checkpoint.latest_step(elastic) == 5
  smaller = tiny_config(train=dict(steps=10), mesh=dict(data=1, fsdp=devices))
  train.train_and_evaluate(smaller, elastic, jax.devices()[:devices])
  a, b = _train_losses(straight), _train_losses(elastic)
  np.testing.assert_allclose([b[s] for s in range(6, 11)], [a[s] for s in range(6, 11)], rtol=1e-5)


_KILL_DURING_SAVE = textwrap.dedent('''
    """Trains; right after the async save of step KILL_STEP has started, the process SIGKILLs itself."""
    import os, signal, sys
    import jax
    from llm_jax import checkpoint, train
    sys.path.insert(0, {tests!r})
    from helpers import tiny_config

    original_save = checkpoint.save

    def save_then_die(manager, step, *args, **kwargs):
      started = original_save(manager, step, *args, **kwargs)
      if step == {kill_step}:
        os.kill(os.getpid(), signal.SIGKILL)  # the background thread is still writing
      return started

    checkpoint.save = save_then_die
    config = tiny_config(train=dict(steps=10), checkpoint=dict(every=3, keep=5))
    train.train_and_evaluate(config, {workdir!r}, jax.devices()[:1])
''')


def test_sigkill_during_async_save_resumes_from_the_previous_checkpoint(tmp_path):
  workdir = str(tmp_path / 'killed')
  script = tmp_path / 'kill_during_save.py'
  script.write_text(_KILL_DURING_SAVE.format(tests=os.path.dirname(__file__), kill_step=6, workdir=workdir))
  killed = subprocess.run([sys.executable, str(script)], cwd=REPO, env=_env(1), capture_output=True, text=True,
                          timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert checkpoint.latest_step(workdir) == 3  # step 6 was cut off: never listed, never restored
  config = tiny_config(train=dict(steps=10), checkpoint=dict(every=3, keep=5))
  train.train_and_evaluate(config, workdir, jax.devices()[:1])
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight, jax.devices()[:1])
  a, b = _train_losses(straight), _train_losses(workdir)
  for step in range(4, 11):
    assert a[step] == b[step], step
  assert checkpoint.latest_step(workdir) == 10


def test_unwritable_workdir_is_reported_before_training(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(checkpoint.CheckpointError, match=r'is not writable'):
    train.train_and_evaluate(tiny_config(), str(blocker / 'run'), jax.devices()[:1])


def test_failed_save_names_the_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  original = ocp.CheckpointManager.save

  def disk_full_after_step_2(self, step, *args, **kwargs):
    if step > 2:
      raise OSError(28, 'No space left on device')
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', disk_full_after_step_2)
  config = tiny_config(train=dict(steps=6), checkpoint=dict(every=2))
  with pytest.raises(checkpoint.CheckpointError, match=r'step 4 .*No space left on device; the last complete '
                                                       r'checkpoint is .*checkpoints/2'):
    train.train_and_evaluate(config, workdir, jax.devices()[:1])


def test_nonfinite_report_names_the_tensors(tmp_path):
  config = tiny_config(model=dict(init_std=float('inf')), train=dict(steps=3))
  with pytest.raises(train.NonFiniteError, match=r'step 1 \(train batch 0\).*non-finite gradients: .*embed'):
    train.train_and_evaluate(config, str(tmp_path / 'run'), jax.devices()[:1])
