"""One check of a whole config before anything is read, prepared or compiled: `validate(config, num_devices)`.

Each part checks the fields it implements, against its own registry of names (model/, objectives/, data/, optim),
and config checks the run's own fields (mesh, batch, cadences). This module only calls them, in order, and checks
what spans two parts (the objective against the data source, generation tasks against the objective). It runs
once per run: train_and_evaluate calls it and builds its Trainer validated; a bare Runtime calls it itself.
"""

from __future__ import annotations

from llm_jax import config as config_lib
from llm_jax import data
from llm_jax import model
from llm_jax import objectives
from llm_jax import optim
from llm_jax import profiling
from llm_jax import rewards
from llm_jax import storage
from llm_jax import xla_options
from llm_jax.errors import fail


def validate(config, num_devices: int) -> dict[str, int]:
  """Raises ConfigError naming the first inconsistent field; returns the resolved mesh shape."""
  model.check_config(config)
  objectives.check_config(config)
  _check_objective_against_source(config)
  if objectives.REGISTRY[config.model.objective].learns_from_rollouts:
    rewards.check_config(config)  # the reward functions' names and weights (grpo)
  data.check_config(config)
  optim.check_config(config.train)
  mesh = config_lib.check_run(config, num_devices)
  _check_generation_tasks(config)
  xla_options.parse_options(config.xla.options)
  profiling.parse_steps(config.train.profile_steps)
  return mesh


def _check_objective_against_source(config) -> None:
  """Preference objectives train on pairs, and pairs only train them; rollout objectives (grpo) sample from prompts,
  and prompts only feed them."""
  objective, source = config.model.objective, config.data.source
  learns_from_rollouts = objectives.REGISTRY[objective].learns_from_rollouts
  if learns_from_rollouts != (source in data.PROMPT_SOURCES):
    if learns_from_rollouts:
      fail('data.source', f'{source!r}: model.objective={objective} samples completions of prompts: use '
           f'{" or ".join(data.PROMPT_SOURCES)}')
    rollout_objectives = [name for name, cls in objectives.REGISTRY.items() if cls.learns_from_rollouts]
    fail('model.objective', f'{objective!r}: data.source={source} yields prompts, which model.objective='
         f'{" or ".join(rollout_objectives)} learns from')
  if learns_from_rollouts:
    return
  if objectives.REGISTRY[objective].trains_on_pairs == (source in data.PAIR_SOURCES):
    return
  if objectives.REGISTRY[objective].trains_on_pairs:
    fail('data.source', f'{source!r}: model.objective={objective} trains on preference pairs: use '
         f'{" or ".join(data.PAIR_SOURCES)}')
  pair_objectives = [name for name, cls in objectives.REGISTRY.items() if cls.trains_on_pairs]
  fail('model.objective', f'{objective!r}: data.source={source} yields preference pairs, which '
       f'model.objective={" or ".join(pair_objectives)} trains on')


def _check_generation_tasks(config) -> None:
  task_file = config.eval.task_file
  if not task_file:
    return
  if not objectives.REGISTRY[config.model.objective].causal:
    causal = ' or '.join(name for name, cls in objectives.REGISTRY.items() if cls.causal)
    fail('eval.task_file', f'generation tasks need a causal model (model.objective={causal})')
  if not storage.exists(task_file):
    fail('eval.task_file', f'{task_file}: no such file')
