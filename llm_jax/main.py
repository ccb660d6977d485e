"""Train a model: `python -m llm_jax.main --config=experiments/tiny.py --workdir=DIR [--config.a.b=v ...]`.

Thin on purpose: flags -> config -> train.train_and_evaluate(config, workdir), which tests call directly.
"""

from __future__ import annotations


from absl import app, flags
from ml_collections import config_flags

from llm_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (experiments/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer; '
                               'a run restarted with the same workdir resumes.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, to start JAX\'s '
                                   'multi-process runtime (with --num_processes and --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index in a multi-process run (0-based).')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Start the multi-process runtime by auto-detection '
                                 '(TPU pod slices, SLURM): jax.distributed.initialize() with no arguments.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Compile the train step for the configured mesh, print per-device '
                             'memory and FLOPs, and exit without training.')
_TARGET = flags.DEFINE_string('target', None, 'With --dry_run: compile for this hardware instead of this host\'s '
                              'devices, from any machine: a TPU slice (v4-8, v5e-8, v5p-8, v6e-8, v5p-64, ...) or a '
                              'GPU node (h100, h100x8, h200, h200x8, a100, a100x8); see llm_jax/targets.py.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=experiments/tiny.py')
  from llm_jax import sharding, xla_options
  xla_options.apply_memory_fraction(config)  # before the first jax call starts the backend
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto=_DISTRIBUTED.value)
  if _TARGET.value and not _DRY_RUN.value:
    raise app.UsageError('--target goes with --dry_run (it compiles for hardware this machine may not have)')
  if _DRY_RUN.value:
    from llm_jax import dry_run
    dry_run.report(config, target=_TARGET.value)
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  from llm_jax import train  # after flag parsing: keeps --help fast
  result = train.train_and_evaluate(config, _WORKDIR.value)  # cli.run prints a UserError as one line
  if result.get('signal') == 'SIGINT':  # Ctrl-C: the line above already said where it saved
    return 130  # the conventional status of a program stopped by SIGINT
  if result.get('preempted'):
    print('preempted: checkpoint saved; restart with the same --workdir to resume')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run(main)
