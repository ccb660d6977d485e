"""LoRA: adapter shapes, frozen base (bit-identical, no optimizer state), merge == base + adapters, adapters-only
save/load, init_from a checkpoint without adapters."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint
from llm_jax import data
from llm_jax import lora_io
from llm_jax import train
from llm_jax.model import lora
import helpers


def tiny_config(rank=4, targets='q,k,v,o,gate,up,down', scan=True):
  # attention, log_every, eval.every and checkpoint.every: get_config()'s, as this file always had them.
  return helpers.tiny_config(model=dict(attention='auto', scan_layers=scan), data=dict(global_batch_size=4),
                             train=dict(steps=3, warmup_steps=0, log_every=10), eval=dict(every=500, steps=1),
                             checkpoint=dict(every=500, async_save=False),
                             lora=dict(rank=rank, alpha=8.0, targets=targets))


def _one_device():
  return jax.devices()[:1]


def test_adapter_shapes_as_configured():
  c = tiny_config(rank=3, targets='q,o,down')
  params = train.abstract_params(c)
  layers = params['layers']
  L, D, N, K, H, F = 2, 32, 4, 2, 8, 64
  assert layers['attn']['q']['lora_a'].shape == (L, D, 3)
  assert layers['attn']['q']['lora_b'].shape == (L, 3, N, H)
  assert layers['attn']['o']['lora_a'].shape == (L, N, H, 3)
  assert layers['attn']['o']['lora_b'].shape == (L, 3, D)
  assert layers['mlp']['down']['lora_a'].shape == (L, F, 3)
  assert layers['mlp']['down']['lora_b'].shape == (L, 3, D)
  for name in ('k', 'v'):
    assert set(layers['attn'][name]) == {'kernel'}
  for name in ('gate', 'up'):
    assert set(layers['mlp'][name]) == {'kernel'}
  base, adapters = lora.split(params)
  assert not lora.has_adapters(base) and jax.tree.leaves(adapters)
  assert jax.tree.structure(lora.combine(base, adapters)) == jax.tree.structure(params)
  del K


def _randomise_adapters(params, seed=1):
  """Non-zero B (fresh adapters are zero, which would make the merge test trivial)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in leaves:
    if lora._is_adapter_path(path):  # pylint: disable=protected-access
      x = jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
    out.append(x)
  return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize('scan', [True, False])
def test_merged_logits_equal_base_plus_adapters(scan):
  c = tiny_config(rank=4, scan=scan)
  model = train.create_model(c)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
  params = _randomise_adapters(nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)['params']))
  with_adapters = model.apply({'params': params}, tokens)
  base_config = tiny_config(rank=0, scan=scan)
  merged = lora.merge(params, c.lora.alpha, c.lora.rank)
  merged_logits = train.create_model(base_config).apply({'params': merged}, tokens)
  base_logits = train.create_model(base_config).apply({'params': lora.split(params)[0]}, tokens)
  np.testing.assert_allclose(merged_logits, with_adapters, atol=2e-5, rtol=2e-5)
  assert np.abs(np.asarray(base_logits) - np.asarray(with_adapters)).max() > 1e-3  # adapters matter


def test_frozen_base_bit_identical_and_no_optimizer_state():
  c = tiny_config(rank=4)
  c.data.source = 'synthetic'
  trainer = train.Trainer(c, '/tmp/unused', _one_device())
  state = trainer.fresh_state()
  before = jax.device_get(state.params)
  base_before, adapters_before = lora.split(before)
  iterator = data.make_iterator(c, 'train')
  for _ in range(3):
    state, metrics = trainer.train_step(state, trainer.put(next(iterator)))
  after = jax.device_get(state.params)
  base_after, adapters_after = lora.split(after)
  for x, y in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
    assert x.tobytes() == y.tobytes()
  changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(adapters_before),
                                                      jax.tree.leaves(adapters_after))]
  assert all(changed)
  assert float(metrics['grad_norm']) > 0
  # Optimizer state: two moments for the adapters only (plus scalar counters).
  adapter_size = sum(x.size for x in jax.tree.leaves(adapters_before))
  state_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert state_size == 2 * adapter_size


def test_save_and_load_adapters_only(tmp_path):
  c = tiny_config(rank=2, targets='q,v')
  model = train.create_model(c)
  params = _randomise_adapters(nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))['params']))
  directory = lora_io.save_adapters(params, str(tmp_path / 'adapters'), c.lora)
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(lora.split(params)[0]))
  assert on_disk < base_bytes  # the base weights are not in it
  restored = lora_io.load_adapters(directory, params)
  for x, y in zip(jax.tree.leaves(lora.split(params)[1]), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match='no lora_a'):
    lora_io.save_adapters(lora.split(params)[0], str(tmp_path / 'none'))


@pytest.mark.slow
def test_init_from_base_checkpoint_keeps_fresh_adapters(tmp_path):
  base_config = tiny_config(rank=0)
  base_config.data.source = 'synthetic'
  base_config.train.steps = 2
  train.train_and_evaluate(base_config, str(tmp_path / 'base'), _one_device())
  c = tiny_config(rank=4)
  c.data.source = 'synthetic'
  c.train.steps = 2
  c.train.init_from = str(tmp_path / 'base')
  train.train_and_evaluate(c, str(tmp_path / 'lora'), _one_device())
  like = train.abstract_params(base_config)
  source, _ = checkpoint.load_params(str(tmp_path / 'base'), like)
  tuned_like = train.abstract_params(c)
  tuned, _ = checkpoint.load_params(str(tmp_path / 'lora'), tuned_like)
  base_tuned, adapters = lora.split(tuned)
  for x, y in zip(jax.tree.leaves(source), jax.tree.leaves(base_tuned)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(adapters))


def test_lora_workdir_generates_like_the_merged_model(tmp_path):
  """load_workdir of a LoRA run keeps the adapters (the decode model has the same tree); its greedy tokens equal
  those of a plain model given lora.merge's weights."""
  from llm_jax import convert, decoding
  from llm_jax import workdir as workdir_lib
  from llm_jax.model import TransformerConfig
  c = tiny_config(rank=4)
  c.data.source = 'synthetic'
  model = train.create_model(c)
  params = _randomise_adapters(nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))['params']))
  convert.write_workdir(c, jax.device_get(params), str(tmp_path / 'lora'), dict(model=c.model.to_dict()))
  loaded = workdir_lib.load_workdir(str(tmp_path / 'lora'), devices=_one_device(), need_tokenizer=False)
  assert lora.has_adapters(loaded.params) and loaded.model_config.lora_rank == 4
  prompts = [[1, 2, 3], [5, 6, 7, 8, 9]]
  got = decoding.generate(loaded.model_config, loaded.params, prompts, 6)
  merged = lora.merge(params, c.lora.alpha, c.lora.rank)
  expected = decoding.generate(TransformerConfig.from_config(tiny_config(rank=0)), merged, prompts, 6)
  assert got == expected


def test_fresh_adapters_equal_those_of_a_fresh_state():
  """LoRA init_from builds only the adapters; they must be the adapters a fresh run would start with."""
  trainer = train.Trainer(tiny_config(), '/tmp/unused', _one_device())
  adapters = trainer.fresh_adapters()
  _, expected = lora.split(trainer.fresh_state().params)
  assert jax.tree.structure(adapters) == jax.tree.structure(expected) and jax.tree.leaves(adapters)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(adapters), jax.device_get(expected))


def test_lora_run_resumes_from_its_own_checkpoint(tmp_path):
  c = tiny_config(rank=4)
  c.data.source = 'synthetic'
  c.train.steps = 2
  workdir = str(tmp_path / 'lora')
  train.train_and_evaluate(c, workdir, _one_device())
  c.train.steps = 4
  train.train_and_evaluate(c, workdir, _one_device())
  assert checkpoint.latest_step(workdir) == 4
