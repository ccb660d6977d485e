"""The lean train step (one gradient norm shared with the clip, no per-leaf flags or param norm in the step) gives
bit-for-bit the losses, gradient norms and parameters of the step it replaced, kept here verbatim as the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import objectives
from llm_jax import optim
from llm_jax import train
from llm_jax.data import synthetic
from llm_jax.model import lora as lora_lib
import helpers


tiny_config = helpers.tiny_config  # its steps run by hand: no loop reads the cadences


def old_optimizer(train_config, trainable_mask=None):
  """optim.make_optimizer before the lean step: optax's own clip, which computes a second global norm."""
  if trainable_mask is not None:
    labels = lambda params: jax.tree.map(lambda t: 'train' if t else 'freeze', trainable_mask(params))
    return optax.multi_transform({'train': old_optimizer(train_config), 'freeze': optax.set_to_zero()}, labels)
  parts = [optax.clip_by_global_norm(train_config.grad_clip)] if train_config.grad_clip > 0 else []
  parts += [optim.scale_by_adam(train_config.beta1, train_config.beta2, train_config.eps, train_config.moments_dtype),
            optax.add_decayed_weights(train_config.weight_decay, mask=optim.decay_mask)]
  return optax.chain(*parts)


def old_train_step(config, model, optimizer):
  """train.make_train_step before the lean step (accum == 1, no mesh), verbatim otherwise."""
  skip_nonfinite = config.train.nonfinite == 'skip'
  schedule = optim.make_schedule(config.train)

  def step(state, batch):
    batch = objectives.prepare_batch(config, batch, state.step)
    tokens = jnp.maximum(jnp.sum(batch['loss_mask']), 1.0)
    grad_fn = jax.value_and_grad(lambda p, mb: train.loss_sum(p, mb, model) / tokens)
    loss, grads = grad_fn(state.params, batch)
    if config.lora.rank:
      trainable = lora_lib.trainable_mask(grads)
      grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    learning_rate = schedule(state.step)
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: -learning_rate * u, updates))
    if config.lora.rank:
      params = jax.tree.map(lambda new, old, t: new if t else old, params, state.params, trainable)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state = keep_old(params, state.params), keep_old(opt_state, state.opt_state)
    metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=optax.global_norm(params),
                   learning_rate=learning_rate, finite=finite, target_tokens=tokens,
                   nonfinite_grads=jax.tree.map(lambda g: ~jnp.all(jnp.isfinite(g)), grads))
    return train.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


@pytest.mark.parametrize('grad_clip,lora_rank', [(0.05, 0), (0.05, 2)])
def test_lean_step_is_bit_for_bit_the_old_step(grad_clip, lora_rank):
  config = tiny_config(train=dict(grad_clip=grad_clip), lora=dict(rank=lora_rank))
  trainer = train.Trainer(config, '/tmp/unused', jax.devices()[:1])
  mask = lora_lib.trainable_mask if lora_rank else None
  old_step = jax.jit(old_train_step(config, trainer.model, old_optimizer(config.train, mask)))
  new_step = jax.jit(train.make_train_step(config, trainer.model, trainer.optimizer))
  old_state = new_state = trainer.fresh_state()
  clipped = False
  for k in range(3):
    batch = jax.tree.map(jnp.asarray, synthetic.make_batch(config, 'train', k))
    old_state, old_metrics = old_step(old_state, batch)
    new_state, new_metrics = new_step(new_state, batch)
    for key in ('loss', 'grad_norm', 'learning_rate', 'finite', 'target_tokens'):
      np.testing.assert_array_equal(new_metrics[key], old_metrics[key], err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, new_state.params, old_state.params)
    jax.tree.map(np.testing.assert_array_equal, new_state.opt_state, old_state.opt_state)
    np.testing.assert_allclose(trainer.param_norm(new_state.params), old_metrics['param_norm'], rtol=1e-6)
    clipped |= bool(grad_clip) and float(old_metrics['grad_norm']) > grad_clip
  assert clipped or not grad_clip, 'the clip never acted: the test would not see a wrong clip norm'
  assert 'param_norm' not in new_metrics and 'nonfinite_grads' not in new_metrics


def test_nonfinite_report_names_the_leaves_from_the_squared_norms():
  config = tiny_config(train=dict(nonfinite='stop'))
  monitor = train.NonFiniteMonitor(config.train, ['embed/embedding', 'layers/attn/q/kernel', 'lm_head/kernel'])
  metrics = dict(finite=np.bool_(False), loss=np.float32(np.nan), grad_norm=np.float32(np.inf),
                 grad_squared_norms=np.array([1.0, np.inf, np.nan], np.float32))
  with pytest.raises(train.NonFiniteError, match=r'non-finite gradients: layers/attn/q/kernel, lm_head/kernel '):
    monitor.check(4, metrics)
