"""The objective interface (llm_jax.objectives): clm, mlm and SFT batches through `make_train_step(objective)`
give bit-for-bit the losses, gradient norms and parameters of the step before objectives owned their loss, kept
here verbatim as the reference (as tests/test_lean_step.py keeps the step before it); the eval sums equal the
old eval step's; the registry of names is config's list of choices; auxiliary terms the model sows reach the loss."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax import objectives
from llm_jax import optim
from llm_jax import runtime
from llm_jax import sharding
from llm_jax import train
from llm_jax.data import sft
from llm_jax.data import synthetic
from llm_jax.model import lora as lora_lib
from llm_jax.objectives import preference
import helpers


# Its steps run by hand: no loop reads the cadences.
tiny_config = helpers.tiny_config_with(model=dict(num_layers=1), train=dict(grad_clip=0.05))


# --- the step before objectives owned their loss (train.py at 0622b7a), verbatim ----------------------------------

def token_losses(logits, targets):
  """Per-token cross-entropy in float32: [B,T,V], [B,T] -> [B,T]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_sum(params, batch, model) -> jax.Array:
  """Sum of masked token losses (divided by the token count of the whole step by the caller)."""
  logits = model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'])
  return jnp.sum(token_losses(logits, batch['targets']) * batch['loss_mask'])


def loss_sums_with_z(params, batch, model) -> tuple[jax.Array, jax.Array]:
  logits = model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'])
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0]
  mask = batch['loss_mask']
  return jnp.sum((log_z - target_logits) * mask), jnp.sum(jnp.square(log_z) * mask)


def _microbatches(batch, accum: int):
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def old_train_step(config, model, optimizer, mesh=None):
  accum = config.train.grad_accum_steps
  z_coef = config.train.z_loss
  skip_nonfinite = config.train.nonfinite == 'skip'
  schedule = optim.make_schedule(config.train)
  rules = sharding.rules_of(config)

  def step(state, batch):
    with runtime.sharding_context(mesh, rules):
      batch = objectives.prepare_batch(config, batch, state.step)  # clm: as is; mlm: masking of (seed, step)
      tokens = jnp.maximum(jnp.sum(batch['loss_mask']), 1.0)
      if z_coef:
        def objective(p, mb):  # (what is differentiated, its parts (cross-entropy, z-loss term))
          ce, z = loss_sums_with_z(p, mb, model)
          return (ce + z_coef * z) / tokens, (ce / tokens, z_coef * z / tokens)
      else:  # the plain cross-entropy, exactly as before z-loss existed (same numbers, same resumes)
        def objective(p, mb):
          ce = loss_sum(p, mb, model) / tokens
          return ce, (ce, jnp.zeros((), jnp.float32))
      grad_fn = jax.value_and_grad(objective, has_aux=True)
      if accum == 1:
        (_, (loss, z_term)), grads = grad_fn(state.params, batch)
      else:
        def body(carry, microbatch):
          loss_acc, z_acc, grads_acc = carry
          (_, (loss_mb, z_mb)), grads_mb = grad_fn(state.params, microbatch)
          return (loss_acc + loss_mb, z_acc + z_mb, jax.tree.map(jnp.add, grads_acc, grads_mb)), None
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        scalar = jnp.zeros((), jnp.float32)
        (loss, z_term, grads), _ = jax.lax.scan(body, (scalar, scalar, zeros), _microbatches(batch, accum))
      if config.lora.rank:
        trainable = lora_lib.trainable_mask(grads)
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
      squared = optim.squared_norms(grads)
      grad_norm = optim.norm_of(squared)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params, global_norm=grad_norm)
      learning_rate = schedule(state.step)
      params = optax.apply_updates(state.params, jax.tree.map(lambda u: -learning_rate * u, updates))
      if config.lora.rank:
        params = jax.tree.map(lambda new, old, t: new if t else old, params, state.params, trainable)
      finite = jnp.isfinite(loss) & jnp.isfinite(z_term) & jnp.isfinite(grad_norm)
      if skip_nonfinite:
        keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = keep_old(params, state.params), keep_old(opt_state, state.opt_state)
      metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=learning_rate, finite=finite,
                     target_tokens=tokens, z_loss=z_term, grad_squared_norms=jnp.stack(squared))
      return train.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def old_eval_step(config, model):
  def step(params, batch, index=0):
    batch = objectives.prepare_batch(config, batch, objectives.EVAL_STEP - index)
    logits = model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'])
    mask = batch['loss_mask']
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == batch['targets']) * mask)
    return jnp.sum(token_losses(logits, batch['targets']) * mask), jnp.sum(mask), correct
  return step


# --- batches --------------------------------------------------------------------------------------------------------

def sft_batch(config, k):
  """Packed SFT rows (llm_jax.data.sft.pack): answers only in the loss, padding, several examples a row."""
  rng = np.random.default_rng(k)
  examples = []
  for i in range(24):
    n = int(rng.integers(4, 12))
    tokens = rng.integers(3, config.model.vocab_size, n).astype(np.int32)
    loss = np.arange(n) >= int(rng.integers(1, n - 1))
    examples.append(sft.Example(tokens, loss, f'x:{i}'))
  rows = sft.pack(examples, config.data.seq_len, pad_id=0)
  return {key: jnp.asarray(value[:config.data.global_batch_size]) for key, value in rows.items()}


def batch_of(kind, config, k):
  if kind == 'sft':
    return sft_batch(config, k)
  return jax.tree.map(jnp.asarray, synthetic.make_batch(config, 'train', k))


CASES = {  # plain clm is tests/test_lean_step.py's case through the same make_train_step; clm's loss is sft_lora's
    'mlm_z_accum': dict(model=dict(objective='mlm'), train=dict(z_loss=1e-2, grad_accum_steps=2)),  # mlm subclasses clm
    'sft_lora': dict(lora=dict(rank=2)),
}


@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.slow) if c != 'sft_lora' else c
                                  for c in sorted(CASES)])
def test_objective_step_is_bit_for_bit_the_old_step(case):
  config = tiny_config(**CASES[case])
  kind = 'sft' if case.startswith('sft') else 'synthetic'
  trainer = train.Trainer(config, '/tmp/unused', jax.devices()[:1])
  old_step = jax.jit(old_train_step(config, trainer.model, trainer.optimizer))
  new_step = jax.jit(train.make_train_step(config, trainer.model, trainer.optimizer, objective=trainer.objective))
  old_eval, new_eval = jax.jit(old_eval_step(config, trainer.model)), jax.jit(runtime.make_eval_step(config, trainer.model))
  old_state = new_state = trainer.fresh_state()
  for k in range(2):
    batch = batch_of(kind, config, k)
    old_state, old_metrics = old_step(old_state, batch)
    new_state, new_metrics = new_step(new_state, batch)
    for key in ('loss', 'z_loss', 'grad_norm', 'learning_rate', 'finite', 'target_tokens', 'grad_squared_norms'):
      np.testing.assert_array_equal(new_metrics[key], old_metrics[key], err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, new_state.params, old_state.params)
    jax.tree.map(np.testing.assert_array_equal, new_state.opt_state, old_state.opt_state)
    if case.startswith('mlm'):  # the eval step (the same for clm, with no masking)
      old_sums, new_sums = old_eval(new_state.params, batch, k), new_eval(new_state.params, batch, k)
      for old, key in zip(old_sums, ('loss', 'tokens', 'correct')):
        np.testing.assert_array_equal(new_sums[key], old, err_msg=f'eval {key}')
  assert new_state.reference is None  # no frozen copy for objectives that need none


def test_registry_is_configs_list_of_choices():
  # The documented choices (config.py's comments, tests/test_house.py checks them against these registries).
  assert objectives.names() == ('clm', 'mlm', 'dpo', 'grpo')
  assert preference.LOSS_TYPES == ('sigmoid', 'cdpo', 'robust', 'ipo', 'simpo')
  for name, cls in objectives.REGISTRY.items():
    assert cls.name == name
    assert cls.causal == (name != 'mlm'), 'the model makes attention bidirectional for mlm alone'
    c = tiny_config(model=dict(objective=name))
    assert isinstance(objectives.make(c), objectives.Objective)
  config = tiny_config(model=dict(objective='seq2seq'))
  with pytest.raises(config_lib.ConfigError, match=r'config.model.objective: unknown value .seq2seq.; expected one '
                     r'of clm, mlm, dpo, grpo'):
    validation.validate(config, 1)


class SowingModel(nn.Module):
  """A linear LM that records an auxiliary term (as a mixture-of-experts router records its balance loss); like
  the Transformer, it returns a per-token reduction of its logits when given `reduce` (the objectives' contract)."""
  vocab: int = 16

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, reduce=None):
    x = nn.Embed(self.vocab, 8)(tokens)
    self.sow(objectives.AUX_COLLECTION, 'balance', 0.5 * jnp.sum(jnp.square(x)))
    logits = nn.Dense(self.vocab)(x)
    return logits if reduce is None else reduce[0](logits, reduce[1])


def test_sown_auxiliary_terms_join_the_loss_and_the_metrics():
  config = tiny_config()
  model = SowingModel()
  batch = batch_of('synthetic', tiny_config(model=dict(vocab_size=16)), 0)
  params = jax.jit(lambda key: model.init(key, batch['inputs'])['params'])(jax.random.key(0))  # jitted: one compile
  objective = objectives.make(config)
  total, metrics, aux = jax.jit(lambda p: dataclasses.astuple(objective.loss(model, p, batch)))(params)
  x = params['Embed_0']['embedding'][batch['inputs']]
  np.testing.assert_allclose(aux['balance'], 0.5 * jnp.sum(jnp.square(x)), rtol=1e-6)
  np.testing.assert_allclose(total, metrics['loss'], rtol=1e-6)
  # the step divides the objective's sums by its count, the sown terms by the step's real tokens
  out = objective.loss(model, params, batch)
  count, tokens = objective.count(batch), objective.tokens(batch)
  assert float(tokens) == np.sum(batch['segment_ids'] > 0) != float(count)
  np.testing.assert_allclose(out.value(count, tokens), total / count + aux['balance'] / tokens, rtol=1e-6)
  np.testing.assert_allclose(out.step_metrics(count, tokens)['aux/balance'], aux['balance'] / tokens, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda p: objective.loss(model, p, batch).value(1.0, 1.0)))(params)
  plain = jax.jit(jax.grad(lambda p: loss_sum(p, batch, model)))(params)
  # the term's gradient, 2 * 0.5 * x per use of an embedding row, is added to the cross-entropy's
  expected = plain['Embed_0']['embedding'] + jnp.zeros_like(plain['Embed_0']['embedding']).at[
      batch['inputs'].reshape(-1)].add(x.reshape(-1, 8))
  np.testing.assert_allclose(grad['Embed_0']['embedding'], expected, rtol=1e-5, atol=1e-6)
