"""KV-cache decoding against recomputing the full forward pass; sampling sets, seeds and prompt errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import decoding
from llm_jax.model import Transformer, TransformerConfig, init_cache

# init_std 0.2 spreads the logits, so float32 rounding cannot flip a greedy choice between near-ties.
CFG = TransformerConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
                        max_seq_len=48, dtype='float32', init_std=0.2)


@functools.cache
def _params(cfg):
  return nn.unbox(Transformer(cfg).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))['params']


@functools.cache
def _forward(cfg):
  return jax.jit(lambda p, t: Transformer(cfg).apply({'params': p}, t))


def full_forward_greedy(cfg, params, prompts, n):
  """Greedy continuations recomputing the whole forward pass (no cache) for every new token.

  Each row sits at the start of a fixed [B, max_seq_len] buffer: the model is causal, so the zeros to the right
  of a row's cursor never affect the logits it reads."""
  buffer = np.zeros((len(prompts), cfg.max_seq_len), np.int32)
  for row, prompt in enumerate(prompts):
    buffer[row, :len(prompt)] = prompt
  cursors = np.array([len(p) for p in prompts])
  for _ in range(n):
    logits = np.asarray(_forward(cfg)(params, buffer))  # [B,T,V]
    buffer[np.arange(len(prompts)), cursors] = np.argmax(logits[np.arange(len(prompts)), cursors - 1], axis=-1)
    cursors += 1
  return [buffer[row, len(p):len(p) + n].tolist() for row, p in enumerate(prompts)]


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, CFG.vocab_size, size=n).tolist() for n in lengths]


@pytest.mark.parametrize('scan_layers', [True, False])
@pytest.mark.parametrize('mixes', [[(5,), (3, 17)], [(5, 9), (1, 9, 4, 12, 16, 2, 7, 11)]],
                         ids=['batch1+2-two-buckets', 'batch2+8'])
def test_cached_greedy_equals_full_forward(scan_layers, mixes):
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  params = _params(cfg)
  for lengths in mixes:  # prompt lengths of one batch
    prompts = _prompts(lengths, seed=len(lengths))
    assert decoding.generate(cfg, params, prompts, max_new_tokens=8) == full_forward_greedy(cfg, params, prompts, 8)


def test_prefill_logits_match_full_forward_for_left_padded_rows():
  """Padded rows give each real token the logits of its own unpadded forward pass (pads are never attended)."""
  params = _params(CFG)
  prompts = _prompts((5, 9))
  batch = decoding.left_pad(prompts, CFG.max_seq_len)
  model = Transformer(CFG, decode=True)
  cache = init_cache(CFG, len(prompts), batch['tokens'].shape[1] + 8)
  logits, _ = model.apply({'params': params, 'cache': cache}, batch['tokens'], batch['segment_ids'],
                          batch['positions'], mutable=['cache'])
  for row, prompt in enumerate(prompts):
    want = Transformer(CFG).apply({'params': params}, jnp.asarray([prompt]))[0]
    np.testing.assert_allclose(logits[row, -len(prompt):], want, rtol=1e-5, atol=1e-5)


def test_eos_stops_a_row_and_max_seq_len_caps_it():
  params = _params(CFG)
  prompts = _prompts((5, 9))
  free = decoding.generate(CFG, params, prompts, max_new_tokens=8)
  eos = free[0][2]  # the third greedy token of row 0 plays EOS
  stopped = decoding.generate(CFG, params, prompts, max_new_tokens=8, eos_id=eos)
  assert stopped[0] == free[0][:free[0].index(eos) + 1]
  assert stopped[1] == free[1][:free[1].index(eos) + 1] if eos in free[1] else stopped[1] == free[1]
  near_limit = _prompts((CFG.max_seq_len - 3, 5))
  assert [len(r) for r in decoding.generate(CFG, params, near_limit, max_new_tokens=8)] == [3, 8]


def test_sharded_params_decode_the_same():
  params = _params(CFG)
  prompts = _prompts((5, 9))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ('fsdp', 'tensor'))
  spec = lambda x: jax.sharding.PartitionSpec(*(('fsdp', 'tensor')[:x.ndim] if x.ndim >= 2 and x.shape[0] % 2 == 0
                                                and x.shape[1] % 2 == 0 else ()))
  sharded = jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(x))), params)
  assert any(len(x.sharding.device_set) == 4 for x in jax.tree.leaves(sharded))
  assert decoding.generate(CFG, sharded, prompts, 8) == decoding.generate(CFG, params, prompts, 8)


def test_top_k_and_top_p_never_leave_the_allowed_set():
  logits = jnp.log(jnp.asarray([[0.02, 0.3, 0.05, 0.4, 0.13, 0.1]] * 4000))  # [B,V] distinct probabilities
  draw = lambda sampling, seed: np.asarray(decoding.sample(logits, jax.random.key(seed), sampling))
  top2 = draw(decoding.Sampling(temperature=1.0, top_k=2), 0)
  assert set(top2.tolist()) == {1, 3}
  # top_p=0.75: 0.4 + 0.3 = 0.7 < 0.75, so the third most likely (0.13) is needed as well.
  nucleus = draw(decoding.Sampling(temperature=1.0, top_p=0.75), 1)
  assert set(nucleus.tolist()) == {1, 3, 4}
  both = draw(decoding.Sampling(temperature=2.0, top_k=3, top_p=0.5), 2)
  assert set(both.tolist()) <= {1, 3, 4}
  assert set(draw(decoding.Sampling(temperature=1.0, top_p=0.3), 3).tolist()) == {3}
  # vocab_limit: ids of a padded vocabulary are never drawn.
  limited = np.asarray(decoding.sample(logits, jax.random.key(4), decoding.Sampling(temperature=1.0), vocab_limit=3))
  assert set(limited.tolist()) <= {0, 1, 2}
  # the kept tokens are drawn in proportion to their renormalised probabilities
  np.testing.assert_allclose(np.mean(top2 == 3), 0.4 / 0.7, atol=0.03)


def test_temperature_zero_is_greedy_and_seeds_repeat():
  params = _params(CFG)
  prompts = _prompts((5, 9))
  greedy = decoding.generate(CFG, params, prompts, 8)
  assert decoding.generate(CFG, params, prompts, 8, decoding.Sampling(temperature=0.0, top_k=3), seed=7) == greedy
  hot = decoding.Sampling(temperature=1.5)
  first = decoding.generate(CFG, params, prompts, 8, hot, seed=3)
  assert decoding.generate(CFG, params, prompts, 8, hot, seed=3) == first
  others = [decoding.generate(CFG, params, prompts, 8, hot, seed=s) for s in (4, 5)]
  assert any(o != first for o in others)


def test_prompt_errors_name_the_prompt():
  params = _params(CFG)
  with pytest.raises(decoding.PromptError, match='prompt 1 is empty'):
    decoding.generate(CFG, params, [[1, 2], []], 4)
  with pytest.raises(decoding.PromptError, match=r'prompt 0 has 48 tokens; model.max_seq_len=48'):
    decoding.generate(CFG, params, [[1] * 48], 4)
  with pytest.raises(ValueError, match='only a causal'):
    decoding.generate(dataclasses.replace(CFG, objective='mlm'), params, [[1, 2]], 4)
  with pytest.raises(ValueError, match='top_p must be in'):
    decoding.Sampling(temperature=1.0, top_p=0.0)
