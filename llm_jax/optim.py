"""The optimizer: learning-rate schedule, global-norm clipping, AdamW with a decay mask, moment dtype.

Weight decay applies to matrices only (parameters with 2 or more dimensions), never to norm scales or biases.
Moments can be stored in bfloat16 (config.train.moments_dtype) to halve optimizer memory; the update itself
is computed in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def make_schedule(train_config) -> optax.Schedule:
  """Linear warmup to the peak, then cosine / linear decay to min_lr_ratio * peak, or constant."""
  peak = train_config.learning_rate
  warmup = train_config.warmup_steps
  decay_steps = max(1, train_config.steps - warmup)
  end = peak * train_config.min_lr_ratio
  if train_config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train_config.min_lr_ratio)
  elif train_config.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
  """True for parameters that get weight decay: matrices, not 1-D norm scales or biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


class ScaleByAdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, moments_dtype) -> optax.GradientTransformation:
  """Adam's update direction with both moments stored in `moments_dtype` (optax only lowers the first)."""
  moments_dtype = jnp.dtype(moments_dtype)

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, moments_dtype)
    return ScaleByAdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                      state.nu, updates)
    mu_hat_scale = 1.0 / (1 - b1 ** count.astype(jnp.float32))
    nu_hat_scale = 1.0 / (1 - b2 ** count.astype(jnp.float32))
    new_updates = jax.tree.map(lambda m, v: (m * mu_hat_scale) / (jnp.sqrt(v * nu_hat_scale) + eps), mu, nu)
    cast = lambda tree: jax.tree.map(lambda x: x.astype(moments_dtype), tree)
    return new_updates, ScaleByAdamState(count, cast(mu), cast(nu))

  return optax.GradientTransformation(init, update)


def make_optimizer(train_config, trainable_mask=None) -> optax.GradientTransformation:
  """clip -> Adam direction -> decoupled weight decay (masked) -> -learning_rate.

  `trainable_mask` (a tree of bools like the parameters, or a function params -> such a tree; e.g.
  llm_jax.model.lora.trainable_mask) restricts all of it to the True leaves: the others get zero updates and no
  optimizer state at all (LoRA: frozen base weights cost no moments).
  """
  if trainable_mask is not None:
    def labels(params):
      mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
      return jax.tree.map(lambda trainable: 'train' if trainable else 'freeze', mask)
    return optax.multi_transform({'train': make_optimizer(train_config), 'freeze': optax.set_to_zero()}, labels)
  parts = []
  if train_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_config.grad_clip))
  parts += [
      scale_by_adam(train_config.beta1, train_config.beta2, train_config.eps, train_config.moments_dtype),
      optax.add_decayed_weights(train_config.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(make_schedule(train_config)),
  ]
  return optax.chain(*parts)
