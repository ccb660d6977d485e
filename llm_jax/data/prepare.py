"""Command line of the data preparation (the work is done by preparation.py):

    python -m llm_jax.data.prepare --config=experiments/tiny.py [--workdir=/tmp/tiny] [--config.data.max_docs=100]

On a cluster, the tasks run on a datatrove executor and this process waits for them, then writes the shards:

    python -m llm_jax.data.prepare --config=... --config.data.prepared_dir=/shared/prep --executor=slurm \\
        --executor_option=partition=cpu --executor_option=time=4:00:00 --executor_option=cpus_per_task=8 \\
        --executor_logs=/shared/prep-logs

From code call `llm_jax.data.prepare(config, workdir)`. Do not `import llm_jax.data.prepare`: importing a
submodule binds its name on the package, which would hide that function.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
from ml_collections import config_flags

from llm_jax import cli
from llm_jax.data import preparation
from llm_jax.data import preparation_tasks

config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. experiments/tiny.py.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Workdir: gets tokenizer.model and tokenizer.fingerprint; prepared data goes '
                    'to <workdir>/data unless config.data.prepared_dir is set.')
flags.DEFINE_enum('executor', None, ['local', 'slurm', 'ray'], 'Run the preparation tasks on this datatrove '
                  'executor (default: in this process, or its local pool for config.data.prepare_workers > 1).')
flags.DEFINE_multi_string('executor_option', [], 'key=value keyword argument of the datatrove executor, e.g. '
                          'partition=cpu, time=4:00:00, cpus_per_task=8, venv_path=/shared/venv (Slurm); repeat it.')
flags.DEFINE_string('executor_logs', None, 'logging_dir of the executor (default: <prepared dir>-logs); on a '
                    'cluster, a folder every node can write.')
flags.mark_flags_as_required(['config'])


def _option_value(text: str):
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return {'true': True, 'false': False}.get(text.lower(), text)


def _executor(directory: str):
  if not flags.FLAGS.executor:
    return None
  options = {}
  for option in flags.FLAGS.executor_option:
    key, sep, value = option.partition('=')
    if not sep or not key:
      raise app.UsageError(f'--executor_option: {option!r} is not key=value')
    options[key.strip()] = _option_value(value.strip())
  logs = flags.FLAGS.executor_logs or directory.rstrip('/') + '-logs'
  return preparation_tasks.datatrove_executor(flags.FLAGS.executor, options, logs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  started = time.time()
  directory = preparation.output_dir(config, workdir)  # a UserError here is one line (cli.run)
  index = preparation.prepare(config, workdir, executor=_executor(directory))
  elapsed = time.time() - started
  print(f'{preparation.summary(index)}\n{"reused" if elapsed < index["seconds"] / 2 else "prepared"} '
        f'{directory} in {elapsed:.1f}s')


if __name__ == '__main__':
  cli.run(main)
