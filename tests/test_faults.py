"""Fault injection on a tiny run: damaged checkpoints, flag and config-file mistakes, read-only workdirs, runs with
nothing to do. One trained workdir (checkpoints 2, 4, 6) is copied for each case; nothing here retrains it."""

import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from llm_jax import checkpoint, evaluate, generate, train
from llm_jax.data import tokenizer as tokenizer_lib
from test_generate import REPO, tiny_config as generate_config, write_tokenizer

ONE = dict(devices=jax.devices()[:1])


def run_config(**train_fields):
  c = generate_config()
  c.train.update(dict(dict(steps=6, log_every=1), **train_fields))
  c.checkpoint.update(every=2, keep=3, async_save=False)
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 6-step run with a tokenizer and checkpoints at steps 2, 4 and 6."""
  root = str(tmp_path_factory.mktemp('faults'))
  workdir = os.path.join(root, 'run')
  tokenizer_lib.bind_to_workdir(write_tokenizer(os.path.join(root, 'tok.model')), workdir)
  train.train_and_evaluate(run_config(), workdir, **ONE)
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ['2', '4', '6']
  return workdir


def copy_of(run, tmp_path) -> str:
  target = str(tmp_path / 'copy')
  shutil.copytree(run, target)
  return target


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def truncate_an_array_file(workdir, step):
  files = glob.glob(os.path.join(checkpoint.checkpoint_dir(workdir), str(step), 'params', 'ocdbt.process_0', 'd', '*'))
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)


TIMING = ('tokens_per_s', 'mfu')


def untimed(table):
  return [{k: v for k, v in row.items() if k not in TIMING} for row in table]


def tensorboard_purge_steps(workdir) -> list[int]:
  """Steps of the SessionLog START events in the TensorBoard files (TFRecord framing read by hand): a reader
  drops the events at or beyond such a step that earlier files hold."""
  import struct
  from tensorboardX.proto import event_pb2
  steps = []
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')):
    with open(path, 'rb') as f:
      data = f.read()
    at = 0
    while at + 12 <= len(data):
      (length,) = struct.unpack('<Q', data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      if event.HasField('session_log') and event.session_log.status == event.session_log.START:
        steps.append(event.step)
  return steps


def warnings_in(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('warning:')]


# --- damaged checkpoints ----------------------------------------------------------------------------------------

def test_truncated_array_resume_falls_back_and_repeats_the_uninterrupted_losses(run, tmp_path, capfd):
  workdir = copy_of(run, tmp_path)
  truncate_an_array_file(workdir, 6)
  capfd.readouterr()
  train.train_and_evaluate(run_config(), workdir, **ONE)
  out, err = capfd.readouterr()
  damaged = os.path.join(checkpoint.checkpoint_dir(workdir), '6')
  assert warnings_in(err)[0] == (f'warning: checkpoint {damaged} is damaged (unreadable array '
                                 f'{warnings_in(err)[0].split("unreadable array ")[1].split(")")[0]}); '
                                 f'falling back to step 4'), err
  assert 'Traceback' not in err and 'Event loop is closed' not in err, err
  assert f'resuming from {checkpoint.checkpoint_dir(workdir)}/4' in out
  # the damaged step is kept, out of the way; the run saved a fresh step 6
  assert os.path.isdir(os.path.join(workdir, checkpoint.DAMAGED_DIR, '6', 'params'))
  assert checkpoint.latest_step(workdir) == 6
  # metrics.jsonl: the interrupted run's rows 5 and 6 are gone, the resumed run's equal the uninterrupted run's
  assert untimed(rows(workdir)) == untimed(rows(run))
  assert [r['step'] for r in rows(workdir) if 'loss' in r] == [1, 2, 3, 4, 5, 6]
  # TensorBoard: the resumed run's event file asks readers to purge the earlier events from step 5 on
  assert 5 in tensorboard_purge_steps(workdir)


def test_missing_meta_evaluate_and_generate_fall_back(run, tmp_path, capfd):
  workdir = copy_of(run, tmp_path)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(workdir), '6', 'meta'))
  capfd.readouterr()
  result = evaluate.run(workdir, **ONE)
  assert result['step'] == 4
  err = capfd.readouterr().err
  assert len(warnings_in(err)) == 1 and 'checkpoints/6 is damaged (unreadable meta' in err, err
  # the same numbers as evaluating step 4 of the intact run by hand
  assert result['perplexity'] == evaluate.run(run, step=4, output=str(tmp_path / 'by_hand.json'), **ONE)['perplexity']
  prompts = ['the quick brown', 'def main(']
  fallback = generate.run(workdir, prompts, max_new_tokens=4, temperature=0.0, **ONE)
  assert 'falling back to step 4' in capfd.readouterr().err
  assert fallback == generate.run(run, prompts, max_new_tokens=4, temperature=0.0, step=4, **ONE)
  assert os.listdir(checkpoint.checkpoint_dir(workdir)) and not os.path.exists(
      os.path.join(workdir, checkpoint.DAMAGED_DIR))  # read-only jobs move nothing


def test_no_intact_step_is_one_error_naming_the_workdir_and_each_step(run, tmp_path):
  workdir = copy_of(run, tmp_path)
  for step in (2, 4, 6):
    os.remove(os.path.join(checkpoint.checkpoint_dir(workdir), str(step), checkpoint.COMMIT_MARKER))
  with pytest.raises(checkpoint.NoIntactCheckpointError,
                     match=rf'no intact checkpoint in {workdir}: tried steps 6 \(incomplete commit .*\); '
                           rf'4 \(incomplete commit .*\); 2 \(incomplete commit .*\)'):
    evaluate.run(workdir, **ONE)
  with pytest.raises(checkpoint.DamagedCheckpointError, match=r'checkpoints/4 is damaged .* pick another --step'):
    generate.run(workdir, ['x'], step=4, **ONE)
  with pytest.raises(checkpoint.NoIntactCheckpointError, match='tried steps 6'):
    train.train_and_evaluate(run_config(steps=8), workdir, **ONE)
  assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ['2', '4', '6']  # nothing moved or deleted


# --- read-only workdir, runs with nothing to do -----------------------------------------------------------------

def test_evaluate_and_generate_on_a_read_only_workdir(run, tmp_path, monkeypatch, capfd):
  """As root, chmod does not stop writes: every write under the workdir fails as on a read-only mount."""
  import builtins
  real_open, real_makedirs = builtins.open, os.makedirs
  inside = lambda path: os.path.abspath(str(path)).startswith(os.path.abspath(run) + os.sep)

  def read_only_open(path, mode='r', *args, **kwargs):
    if inside(path) and any(c in mode for c in 'wax+'):
      raise OSError(errno.EROFS, 'Read-only file system', str(path))
    return real_open(path, mode, *args, **kwargs)

  def read_only_makedirs(path, *args, **kwargs):
    if inside(path) and not os.path.isdir(path):
      raise OSError(errno.EROFS, 'Read-only file system', str(path))
    return real_makedirs(path, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', read_only_open)
  monkeypatch.setattr(os, 'makedirs', read_only_makedirs)
  capfd.readouterr()
  result = evaluate.run(run, **ONE)
  assert result['step'] == 6 and result['output'] is None and result['perplexity']['loss'] > 0
  err = capfd.readouterr().err
  assert warnings_in(err) == [f'warning: cannot write {run}/eval/step_6_validation.json (Read-only file system); '
                              'the result is printed only (--output=FILE writes it elsewhere)'], err
  elsewhere = str(tmp_path / 'result.json')
  assert evaluate.run(run, output=elsewhere, **ONE)['output'] == elsewhere
  with real_open(elsewhere) as f:
    assert json.load(f)['perplexity'] == result['perplexity']
  with pytest.raises(evaluate.OutputError, match=r'--output .*/eval/x.json: cannot write it'):
    evaluate.run(run, output=os.path.join(run, 'eval', 'x.json'), **ONE)
  assert generate.run(run, ['the quick'], max_new_tokens=2, **ONE)  # generate never writes


def test_config_json_is_rewritten_only_when_the_run_trains(run, tmp_path):
  workdir = copy_of(run, tmp_path)
  before = open(os.path.join(workdir, 'config.json')).read()
  train.train_and_evaluate(run_config(learning_rate=0.5), workdir, **ONE)  # at step 6 of 6: nothing to do
  assert open(os.path.join(workdir, 'config.json')).read() == before


def test_evaluate_and_generate_print_their_output_and_at_most_a_few_stderr_lines(run, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
  jobs = {name: subprocess.Popen([sys.executable, '-m', *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
          for name, args in [('evaluate', ['llm_jax.evaluate', f'--workdir={run}', f'--output={tmp_path}/e.json']),
                             ('generate', ['llm_jax.generate', f'--workdir={run}', '--prompt=the quick',
                                           '--max_new_tokens=2'])]}
  for name, proc in jobs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and len(err.splitlines()) <= 3, f'{name}:\n{err[-3000:]}'
    assert ('"perplexity"' in out) if name == 'evaluate' else out.startswith('=== prompt 0 ===')


# --- flags and config files: one line in every job ------------------------------------------------------------

def _job(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize('args, line', [
    (['llm_jax.main', '--config=experiments/tiny.py', '--workdir=/tmp/x', '--config.train.stepz=5'],
     "error: --config.train.stepz: config.train has no field 'stepz'; did you mean 'steps'?"),
    (['llm_jax.main', '--config=experiments/tiny.py', '--workdir=/tmp/x', '--config.trian.steps=5'],
     "error: --config.trian: config has no field 'trian'; did you mean 'train'?"),
    (['llm_jax.main', '--config=experiments/nope.py', '--workdir=/tmp/x'],
     'error: --config=experiments/nope.py: cannot load it: No such file or directory'),
    (['llm_jax.data.prepare', '--config=experiments/nope.py', '--config.data.max_docs=3'],
     'error: --config=experiments/nope.py: cannot load it: No such file or directory'),
    (['llm_jax.benchmark', '--config=llm_jax/errors.py'],
     'error: --config=llm_jax/errors.py: the file defines no get_config()'),
    (['llm_jax.evaluate', '--workdir=/tmp/x', '--config.eval.stepz=5'],
     "error: --config.eval.stepz: config.eval has no field 'stepz'; did you mean 'steps'?"),
    (['llm_jax.generate', '--workdirr=/tmp/x'], "error: Unknown command line flag 'workdirr'. Did you mean: workdir ?"),
    (['llm_jax.convert', 'to_hf', '--hf_dir=/tmp/x'], 'error: --hf_dir and --workdir are required'),
    (['llm_jax.plot', '--dpi=many'], "error: flag --dpi=many: invalid literal for int() with base 10: 'many'"),
])
def test_flag_mistakes_are_one_line(args, line):
  result = _job(*args)
  assert result.returncode == 1 and result.stderr.strip().splitlines() == [line], result.stderr[-3000:]


# --- Ctrl-C ---------------------------------------------------------------------------------------------------

SMALL = ['--config.data.source=synthetic', '--config.model.vocab_size=64', '--config.model.d_model=32',
         '--config.model.num_layers=1', '--config.model.ffn_dim=64', '--config.data.seq_len=16',
         '--config.data.global_batch_size=4', '--config.train.log_every=1', '--config.eval.every=0',
         '--config.eval.steps=1', '--config.train.schedule=constant',  # no dependence on train.steps
         '--config.checkpoint.every=0']


def _main_cmd(workdir, steps):
  return [sys.executable, '-m', 'llm_jax.main', f'--config={REPO}/experiments/tiny.py', f'--workdir={workdir}',
          f'--config.train.steps={steps}', *SMALL]


def _one_device_env():
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu',
              PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))


def _interrupt_after_rows(cmd, workdir, rows_wanted, signals=1):
  import signal
  import time
  proc = subprocess.Popen(cmd, cwd=REPO, env=_one_device_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics_file = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 180
  while time.time() < deadline and not (os.path.exists(metrics_file) and len(rows(workdir)) >= rows_wanted):
    time.sleep(0.1)
  for i in range(signals):
    if i:
      time.sleep(0.5)  # two signals before the handler runs would count as one
    proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=180)
  return proc.returncode, out, err


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_the_resumed_metrics_equal_an_uninterrupted_run(tmp_path):
  workdir = str(tmp_path / 'run')
  code, out, err = _interrupt_after_rows(_main_cmd(workdir, 100000), workdir, 3)
  saved = checkpoint.latest_step(workdir)
  assert code == 130 and saved is not None and saved >= 3, out + err
  assert f'SIGINT: saved step {saved} to {checkpoint.checkpoint_dir(workdir)}; exiting' in out.splitlines()
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err
  assert [r['step'] for r in rows(workdir)] == list(range(1, saved + 1))  # one row per step, up to the save

  total = saved + 2
  straight = str(tmp_path / 'straight')  # the uninterrupted run, side by side with the resumed one
  procs = [subprocess.Popen(_main_cmd(w, total), cwd=REPO, env=_one_device_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for w in (workdir, straight)]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    # a normal run's stderr is at most a few lines (quiet by default)
    assert proc.returncode == 0 and len(err.splitlines()) <= 3, err[-3000:]
  assert untimed(rows(workdir)) == untimed(rows(straight))


def test_second_ctrl_c_stops_at_once_without_saving(monkeypatch, capfd):
  """In-process (two signals to a subprocess can merge into one): the first SIGINT asks for a save at the next
  step boundary, the second ends the process at once. A save cut short that way is never listed: orbax renames a
  checkpoint into place only when complete (test_multihost kills a process during an async save)."""
  import signal

  class Exited(Exception):
    pass

  def fake_exit(code):
    raise Exited(code)

  monkeypatch.setattr(os, '_exit', fake_exit)
  found = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when the suite runs under `nohup ... &`
  preemption = train.Preemption().install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.reached(7) and preemption.signal_name == 'SIGINT'
    with pytest.raises(Exited) as exited:
      os.kill(os.getpid(), signal.SIGINT)
    assert exited.value.args == (130,)
  finally:
    preemption.uninstall()
  assert signal.getsignal(signal.SIGINT) is found  # the handler it found is back
  assert capfd.readouterr().err.strip() == ('interrupted again: stopped at once, without saving (complete '
                                            'checkpoints are kept)')
