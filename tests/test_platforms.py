"""A job starts quietly on a machine without an accelerator (llm_jax/platforms.py), and only there.

The test extras install the CUDA plugin and libtpu; on a CPU-only machine jax used to begin every job with the
plugin's `cuInit(0) failed` traceback and libtpu's complaints about its environment. These run a job's start-up
in a fresh process with the user's environment (the suite's JAX_PLATFORMS=cpu and log settings removed).
"""

import os
import subprocess
import sys

from helpers import REPO

NOISE = ('Traceback', 'plugin configuration error', 'cuInit', 'TPU_ACCELERATOR_TYPE', 'worker hostname', 'E0000')


def _user_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', 'CUDA_VISIBLE_DEVICES', 'TF_CPP_MIN_LOG_LEVEL', 'XLA_FLAGS')}
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')]))
  env.update(extra)
  return env


def _python(code, **env):
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=_user_env(**env), capture_output=True,
                        text=True, timeout=120)


# A job: cli.run (what every job starts with), then the first use of jax starts its backends.
JOB = '''
import jax
from llm_jax import cli, platforms
def main(argv):
  print(jax.default_backend(), jax.config.jax_platforms, platforms.has_accelerator())
cli.run(main, ['job'])
'''


def test_a_job_on_a_machine_without_accelerator_starts_quietly():
  run = _python(JOB)
  assert run.returncode == 0, run.stderr[-3000:]
  backend, chosen, accelerator = run.stdout.split()
  if accelerator == 'True':  # a GPU or TPU machine: nothing was chosen for jax
    assert chosen == 'None' and backend in ('gpu', 'tpu', 'rocm'), run.stdout
  else:
    assert (backend, chosen) == ('cpu', 'cpu'), run.stdout
  assert not [word for word in NOISE if word in run.stderr], run.stderr[-3000:]


def test_the_users_platforms_and_a_present_accelerator_are_left_alone():
  run = _python('import os; from llm_jax import platforms; print(platforms.quiet_start(), os.environ["JAX_PLATFORMS"])',
                JAX_PLATFORMS='cpu')
  assert run.stdout.split() == ['None', 'cpu'], run.stdout + run.stderr[-2000:]
  # A GPU or TPU here (as jax's hardware checks would report it): jax chooses, as before.
  run = _python('import os, jax; from llm_jax import platforms; platforms.has_accelerator = lambda: True; '
                'print(platforms.quiet_start(), jax.config.jax_platforms, "JAX_PLATFORMS" in os.environ)')
  assert run.stdout.split() == ['None', 'None', 'False'], run.stdout + run.stderr[-2000:]
