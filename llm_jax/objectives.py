"""Training objectives as batch transforms: one hook, `prepare_batch(config, batch, step)`, used by the jitted
train and eval steps; blocks, loss and loop are shared by every objective.

  clm  causal LM. The batch is used as the data pipeline made it (targets = inputs shifted by one).
  mlm  masked LM (BERT). The model's attention is bidirectional (within a document: segment ids still mask
       across packed documents). The original, unshifted tokens are `batch['inputs']`; of the real tokens
       (segment id > 0) each is selected for prediction with probability config.data.mask_prob (15%); a
       selected input becomes [MASK] with probability 80%, a uniformly random id in [0, vocab_size) with 10%,
       and stays itself with 10%. Targets are the original tokens, and the loss counts only the selected
       positions (`loss_mask`); `batch['targets']` from the pipeline is ignored.

[MASK] is config.model.mask_token_id, by default 2: the id every tokenizer of llm_jax.data.tokenizer reserves
for BOS, which the data pipeline never inserts, so [MASK] never occurs as a real token of the data. A model with
another tokenizer (imported from Hugging Face) sets the field to its own mask or an unused id.

Determinism: the selection and replacement of step k are a pure function of (config.data.seed, k): the key is
`fold_in(fold_in(key(seed), MLM_STREAM), k)`. Evaluation uses fixed keys (step = EVAL_STEP), so every evaluation
of a checkpoint masks the same positions and eval losses of different checkpoints are comparable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MLM_STREAM = 0x4D4C4D  # 'MLM': separates the masking randomness from any other use of the data seed
EVAL_STEP = 2**31 - 1  # the `step` of eval steps (a fixed mask per eval batch): one no training run reaches

# Shares of the selected tokens (BERT): [MASK], random id, unchanged.
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1


def mlm_mask(tokens: jax.Array, real: jax.Array, rng: jax.Array, mask_prob: float, mask_id: int,
             vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """BERT masking of `tokens` [B,T] where `real` [B,T] is True: returns (corrupted inputs, selected as float32)."""
  select_rng, kind_rng, random_rng = jax.random.split(rng, 3)
  selected = (jax.random.uniform(select_rng, tokens.shape) < mask_prob) & real
  kind = jax.random.uniform(kind_rng, tokens.shape)
  random_ids = jax.random.randint(random_rng, tokens.shape, 0, vocab_size, dtype=tokens.dtype)
  replaced = jnp.where(kind < MASK_SHARE, jnp.asarray(mask_id, tokens.dtype),
                       jnp.where(kind < MASK_SHARE + RANDOM_SHARE, random_ids, tokens))
  return jnp.where(selected, replaced, tokens), selected.astype(jnp.float32)


def mlm_key(seed: int, step) -> jax.Array:
  """The masking key of step `step` (a traced int is fine) for data seed `seed`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), MLM_STREAM), step)


def _clm(config, batch, step):
  del config, step
  return batch


def _mlm(config, batch, step):
  tokens = batch['inputs']
  inputs, selected = mlm_mask(tokens, batch['segment_ids'] > 0, mlm_key(config.data.seed, step),
                              config.data.mask_prob, config.model.mask_token_id, config.model.vocab_size)
  return dict(batch, inputs=inputs, targets=tokens, loss_mask=selected)


# objective name -> batch transform (chosen once per step function, no string dispatch in the model).
OBJECTIVES = {'clm': _clm, 'mlm': _mlm}


def prepare_batch(config, batch: dict, step) -> dict:
  """The batch the model and the loss see at train step `step` (EVAL_STEP in evaluation), for
  config.model.objective. Pure jnp: call it inside the jitted step."""
  return OBJECTIVES[config.model.objective](config, batch, step)
