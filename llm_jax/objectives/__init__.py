"""Training objectives: each owns its batch preparation, its loss (sums, count, metrics, auxiliary terms) and its
evaluation (interface: llm_jax.objectives.base). The train and eval steps call the run's objective and nothing
else decides what is differentiated.

  clm, mlm   llm_jax.objectives.lm          token cross-entropy (pre-training, SFT; BERT masking)
  dpo        llm_jax.objectives.preference  preference pairs: DPO (sigmoid, robust), IPO, SimPO
  grpo       llm_jax.objectives.grpo        rollouts of prompts: GRPO, BNPO, Dr. GRPO, DAPO; GSPO (TRL's losses)

  make(config)                      the run's objective (config.model.objective)
  prepare_batch(config, batch, step)   make(config).prepare(batch, step)
  names()                           registered names (the choices of config.model.objective)
  check_config(config)              the objective's name and the fields it reads (ConfigError naming the field)
"""

from __future__ import annotations

from llm_jax.errors import check_choice
from llm_jax.objectives.base import AUX_COLLECTION, EVAL_STEP, Loss, Objective, apply_with_aux  # noqa: F401
from llm_jax.objectives.lm import MLM_STREAM, mlm_key, mlm_mask, token_losses  # noqa: F401
from llm_jax.objectives import preference  # noqa: F401  (registers dpo)
from llm_jax.objectives import grpo  # noqa: F401  (registers grpo)
from llm_jax.objectives.registry import REGISTRY, names  # noqa: F401


def check_config(config) -> None:
  check_choice('model.objective', config.model.objective, REGISTRY)
  REGISTRY[config.model.objective].check_config(config)


def make(config) -> Objective:
  return REGISTRY[config.model.objective](config)


def prepare_batch(config, batch: dict, step) -> dict:
  """The batch the model and the loss see at train step `step` (EVAL_STEP - i for eval batch i). Pure jnp."""
  return make(config).prepare(batch, step)
