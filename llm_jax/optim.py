"""The optimizer: learning-rate schedule, global-norm clipping, AdamW with a decay mask, moment dtype.

`make_optimizer` gives the AdamW update *direction* (clipped gradient -> Adam -> + weight decay); the train step
multiplies it by -schedule(step), with `step` the train step. The learning rate is therefore a function of the
step and the data position alone: a skipped non-finite update cannot shift the schedule, and the learning rate
logged is the one applied. Weight decay never applies to norm scales or biases (by name, so the stacked [L, D]
norm scales of scanned layers are spared too). Moments can be stored in bfloat16 (config.train.moments_dtype)
to halve optimizer memory; the update itself is computed in float32.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from llm_jax.errors import check_choice, fail


WSD_SHAPES = {  # progress p in [0, 1] of the decay phase -> fraction of (peak - end) still left
    'linear': lambda p: 1.0 - p,
    'cosine': lambda p: 0.5 * (1.0 + jnp.cos(jnp.pi * p)),
    'sqrt': lambda p: 1.0 - jnp.sqrt(p),  # '1 - sqrt': MiniCPM, Hägele et al. 2024
}


def wsd_decay_steps(train_config) -> int:
  """Steps of the decay phase of schedule='wsd': the last wsd_decay_fraction of train.steps (rounded)."""
  return int(round(train_config.wsd_decay_fraction * train_config.steps))


def _wsd(train_config) -> optax.Schedule:
  """Warmup-stable-decay as a function of the (shifted) step t: linear warmup to the peak over warmup_steps,
  the peak until the last wsd_decay_steps steps, then down to min_lr_ratio * peak along wsd_decay_shape."""
  peak, warmup, steps = train_config.learning_rate, train_config.warmup_steps, train_config.steps
  end = peak * train_config.min_lr_ratio
  decay_steps = wsd_decay_steps(train_config)
  decay_start = steps - decay_steps
  shape = WSD_SHAPES[train_config.wsd_decay_shape]

  def schedule(t):
    t = jnp.asarray(t, jnp.float32)
    warm = peak * t / warmup if warmup else jnp.float32(peak)
    progress = jnp.clip((t - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    decayed = end + (peak - end) * shape(progress)
    return jnp.where(t < warmup, warm, jnp.where(t <= decay_start, peak, decayed))

  return schedule


# config.train.schedule -> the decay after warmup: (peak, decay steps, min_lr_ratio) -> schedule. 'wsd' is a whole
# schedule of its own (_wsd), listed here so that this table is the one list of schedule names.
DECAYS = {
    'cosine': lambda peak, steps, ratio: optax.cosine_decay_schedule(peak, steps, alpha=ratio),
    'linear': lambda peak, steps, ratio: optax.linear_schedule(peak, peak * ratio, steps),
    'constant': lambda peak, steps, ratio: optax.constant_schedule(peak),
    'wsd': None,
}


def make_schedule(train_config) -> optax.Schedule:
  """step (0-based) -> learning rate: linear warmup to the peak, then cosine / linear decay to
  min_lr_ratio * peak, constant, or warmup-stable-decay ('wsd': the peak until the last wsd_decay_fraction of the
  steps, then a linear / cosine / 1-sqrt decay to min_lr_ratio * peak). Step 0 already gets peak / warmup_steps
  (a first step at 0 would be wasted)."""
  peak = train_config.learning_rate
  warmup = train_config.warmup_steps
  if train_config.schedule == 'wsd':
    wsd = _wsd(train_config)
    return lambda step: wsd(step + 1) if warmup else wsd(step)
  decay_steps = max(1, train_config.steps - warmup)
  decay = DECAYS[train_config.schedule](peak, decay_steps, train_config.min_lr_ratio)
  schedule = decay if warmup == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
  return lambda step: schedule(step + 1) if warmup else schedule(step)


MOMENTS_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}  # config.train.moments_dtype


def check_config(train_config) -> None:
  """config.train's optimizer and schedule fields; ConfigError naming the first bad one."""
  t = train_config
  check_choice('train.schedule', t.schedule, DECAYS)
  check_choice('train.moments_dtype', t.moments_dtype, MOMENTS_DTYPES)
  if t.learning_rate <= 0:
    fail('train.learning_rate', f'must be positive, got {t.learning_rate}')
  if t.warmup_steps < 0:
    fail('train.warmup_steps', f'must be >= 0, got {t.warmup_steps}')
  if t.schedule == 'wsd':
    check_choice('train.wsd_decay_shape', t.wsd_decay_shape, WSD_SHAPES)
    if not 0.0 <= t.wsd_decay_fraction <= 1.0:
      fail('train.wsd_decay_fraction', f'must be in [0, 1], got {t.wsd_decay_fraction}')
    decay_steps = wsd_decay_steps(t)
    if t.warmup_steps + decay_steps > t.steps:
      fail('train.wsd_decay_fraction', f'warmup_steps={t.warmup_steps} plus the decay phase '
           f'({t.wsd_decay_fraction} * {t.steps} = {decay_steps} steps) exceed train.steps={t.steps}')


NO_DECAY = ('scale', 'bias')  # leaf names of norm scales and biases


def decay_mask(params):
  """True for parameters that get weight decay: every weight but norm scales and biases."""
  def decays(path, leaf):
    del leaf
    names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]  # skips box attributes
    return names[-1] not in NO_DECAY
  return jax.tree_util.tree_map_with_path(decays, params)


def squared_norms(tree) -> list[jax.Array]:
  """Per-leaf sums of squares, in leaf order: the terms of optax.tree.norm, computed the same way."""
  return [jnp.sum(jnp.square(x.real) + jnp.square(x.imag)) for x in jax.tree.leaves(tree)]


def norm_of(squared: list[jax.Array]) -> jax.Array:
  """The global norm from `squared_norms`: bit for bit optax.tree.norm of the same tree."""
  return jnp.sqrt(jax.tree.reduce(operator.add, squared, initializer=0))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (same arithmetic, same empty state), except that it uses the norm the caller
  passes as `update(..., global_norm=g)`: the train step computes the gradient norm once, for its metrics and for
  the clip. Without the argument it computes the norm itself, as optax does."""

  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    g_norm = optax.tree.norm(updates) if global_norm is None else global_norm
    trigger = jnp.squeeze(g_norm < max_norm)
    clip = lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


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
  """clip -> Adam direction -> + decoupled weight decay (masked); the step scales it by -learning_rate.

  `update(grads, state, params, global_norm=g)` reuses the gradient norm g the caller already has for the clip.

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
    parts.append(clip_by_global_norm(train_config.grad_clip))
  parts += [
      scale_by_adam(train_config.beta1, train_config.beta2, train_config.eps, MOMENTS_DTYPES[train_config.moments_dtype]),
      optax.add_decayed_weights(train_config.weight_decay, mask=decay_mask),
  ]  # the learning rate is applied by the train step (module docstring)
  return optax.chain(*parts)
