"""Token-level language-model objectives: cross-entropy on the targets the loss mask selects.

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
import numpy as np
import optax

from llm_jax.errors import fail
from llm_jax.objectives import base
from llm_jax.objectives.registry import register

MLM_STREAM = 0x4D4C4D  # 'MLM': separates the masking randomness from any other use of the data seed

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


def token_losses(logits, targets):
  """Per-token cross-entropy in float32: [B,T,V], [B,T] -> [B,T]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def log_z_and_target_logit(logits, targets):
  """(log Z, the target's logit) per token in float32: [B,T,V], [B,T] -> two [B,T]."""
  logits = logits.astype(jnp.float32)
  return (jax.nn.logsumexp(logits, axis=-1),
          jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0])


def losses_and_hits(logits, targets):
  """(cross-entropy, 1.0 where the argmax is the target) per token: [B,T,V], [B,T] -> two [B,T]."""
  return token_losses(logits, targets), (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)


@register
class CausalLM(base.Objective):
  """Next-token cross-entropy on the targets of `loss_mask` (pre-training text, and SFT: the sft_jsonl source
  masks everything but the answers). With config.train.z_loss > 0 the total adds z_loss * sum of log(Z)^2 (PaLM),
  Z the softmax normaliser of each target position's logits; the metric `loss` stays the cross-entropy and
  `z_loss` is the added term."""
  name = 'clm'

  def count(self, batch):
    return jnp.maximum(jnp.sum(batch['loss_mask']), 1.0)

  def loss(self, model, params, batch, reference=None):
    del reference
    z_coef = self.config.train.z_loss
    mask = batch['loss_mask']
    if z_coef:  # cross-entropy = log Z - logit[target], from the same log Z the z-loss uses
      (log_z, target_logits), aux = base.apply_with_aux(model, params, batch,
                                                        reduce=(log_z_and_target_logit, batch['targets']))
      ce, z = jnp.sum((log_z - target_logits) * mask), z_coef * jnp.sum(jnp.square(log_z) * mask)
      return base.with_aux(ce + z, dict(loss=ce, z_loss=z), aux)
    # the plain cross-entropy, exactly as before z-loss existed (same numbers, same resumes)
    losses, aux = base.apply_with_aux(model, params, batch, reduce=(token_losses, batch['targets']))
    ce = jnp.sum(losses * mask)
    return base.with_aux(ce, dict(loss=ce, z_loss=jnp.zeros((), jnp.float32)), aux)

  def eval_sums(self, model, params, batch, reference=None):
    del reference
    losses, correct = base.per_token(model, params, batch, losses_and_hits, batch['targets'])
    mask = batch['loss_mask']
    return dict(loss=jnp.sum(losses * mask), tokens=jnp.sum(mask), correct=jnp.sum(correct * mask))

  def eval_metrics(self, totals):
    eval_loss = totals['loss'] / max(totals['tokens'], 1.0)
    # eval_accuracy: next-token accuracy (clm), masked-token accuracy (mlm).
    return dict(eval_loss=eval_loss, eval_perplexity=float(np.exp(min(eval_loss, 50.0))),
                eval_tokens=totals['tokens'], eval_accuracy=totals['correct'] / max(totals['tokens'], 1.0))


@register
class MaskedLM(CausalLM):
  """BERT's masked LM (module docstring): bidirectional attention, the loss on the selected positions."""
  name = 'mlm'
  causal = False

  @classmethod
  def check_config(cls, config):
    m = config.model
    if not 0 <= m.mask_token_id < m.vocab_size:
      fail('model.mask_token_id', f'{m.mask_token_id} is not an id of the vocabulary [0, {m.vocab_size})')

  def prepare(self, batch, step):
    config = self.config
    tokens = batch['inputs']
    inputs, selected = mlm_mask(tokens, batch['segment_ids'] > 0, mlm_key(config.data.seed, step),
                                config.data.mask_prob, config.model.mask_token_id, config.model.vocab_size)
    return dict(batch, inputs=inputs, targets=tokens, loss_mask=selected)
