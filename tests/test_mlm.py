"""Masked LM: BERT masking (15%, 80/10/10, deterministic in (seed, step)), bidirectional vs causal attention,
and a tiny MLM trained through the stdlib pipeline well below the unigram baseline."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import data
from llm_jax import objectives
from llm_jax import train


def mlm_config(objective='mlm', vocab=512):
  c = config_lib.get_config()
  c.model.vocab_size = vocab
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.ffn_dim = 192
  c.model.max_seq_len = 64
  c.model.dtype = 'float32'
  c.model.objective = objective
  c.data.seq_len = 64
  c.data.global_batch_size = 16
  c.checkpoint.async_save = False
  return c


def test_masking_rates_targets_and_determinism():
  c = mlm_config(vocab=1000)
  rng = np.random.default_rng(0)
  tokens = rng.integers(10, 1000, (64, 512)).astype(np.int32)
  segments = np.ones_like(tokens)
  segments[:, -64:] = 0  # padding is never selected
  batch = dict(inputs=jnp.asarray(tokens), targets=jnp.asarray(np.roll(tokens, -1, 1)),
               segment_ids=jnp.asarray(segments), positions=jnp.zeros_like(tokens),
               loss_mask=jnp.ones(tokens.shape, jnp.float32))
  prepare = jax.jit(lambda b, step: objectives.prepare_batch(c, b, step))
  out = jax.device_get(prepare(batch, 7))
  selected = out['loss_mask'] > 0
  real = segments > 0
  assert not selected[~real].any()
  assert abs(selected[real].mean() - 0.15) < 0.005
  np.testing.assert_array_equal(out['targets'], tokens)  # original, unshifted tokens
  sel_inputs, sel_orig = out['inputs'][selected], tokens[selected]
  masked = sel_inputs == c.model.mask_token_id
  kept = sel_inputs == sel_orig
  assert abs(masked.mean() - 0.8) < 0.01
  assert abs(kept.mean() - 0.1) < 0.01  # (a random id equal to the original: 1e-3 of the 10%)
  assert abs((~masked & ~kept).mean() - 0.1) < 0.01
  np.testing.assert_array_equal(out['inputs'][~selected], tokens[~selected])
  again = jax.device_get(prepare(batch, 7))
  np.testing.assert_array_equal(again['inputs'], out['inputs'])
  other = jax.device_get(prepare(batch, 8))
  assert not np.array_equal(other['loss_mask'], out['loss_mask'])
  c.data.seed = 1
  reseeded = jax.device_get(jax.jit(lambda b: objectives.prepare_batch(c, b, 7))(batch))
  assert not np.array_equal(reseeded['loss_mask'], out['loss_mask'])
  clm = mlm_config('clm')
  assert objectives.prepare_batch(clm, batch, 7) is batch


@pytest.mark.parametrize('objective, sees_future', [('mlm', True), ('clm', False)])
def test_bidirectional_attention_sees_future_tokens(objective, sees_future):
  c = mlm_config(objective)
  model = train.create_model(c)
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 512, (1, 32)), jnp.int32)
  segments = jnp.asarray(np.r_[np.ones(20), 2 * np.ones(12)][None], jnp.int32)
  positions = jnp.asarray(np.r_[np.arange(20), np.arange(12)][None], jnp.int32)
  params = model.init(jax.random.key(0), tokens)['params']
  apply = jax.jit(lambda t: model.apply({'params': params}, t, segments, positions))
  base = np.asarray(apply(tokens))
  later = np.asarray(apply(tokens.at[0, 15].set(7)))  # a later token of the same document
  moved = np.abs(later[0, 3] - base[0, 3]).max()
  assert (moved > 1e-4) == sees_future, moved
  np.testing.assert_array_equal(later[0, 20:], base[0, 20:])  # never across documents
  other_doc = np.asarray(apply(tokens.at[0, 25].set(7)))
  np.testing.assert_array_equal(other_doc[0, :20], base[0, :20])


@pytest.mark.slow
def test_mlm_loss_falls_well_below_unigram_baseline(tmp_path):
  c = mlm_config('mlm')
  c.data.source = 'stdlib'
  c.data.max_docs = 150
  c.train.steps = 600
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.01
  c.train.log_every = 100
  c.eval.every = 0
  c.eval.steps = 32  # ~4,900 masked targets: the estimate's standard error ~0.03 nats
  c.checkpoint.every = 0
  workdir = str(tmp_path / 'mlm')
  last = train.train_and_evaluate(c, workdir, jax.devices()[:1])
  with open(os.path.join(workdir, 'data', 'index.json')) as f:
    unigram = json.load(f)['unigram_entropy']
  # Measured (2026-12-07): unigram 5.08 nats, eval_loss 4.41 after 600 steps of the width-64 model (42 s alone).
  # MLM sees 15% of the tokens as targets (154 a step here) and sits on a unigram-like plateau for longer than CLM.
  # Before, 300 steps of a width-128 model reached 4.78 on these 32 eval batches (4.71 on the first 8, which the
  # test read): at the threshold, one data change from failing. 'Well below' needs more steps
  # (experiments/mlm_tiny.py), so this CPU test asserts a clear but smaller margin.
  assert last['eval_loss'] < unigram - 0.3, (last, unigram)


@pytest.mark.slow
def test_mlm_learns_synthetic_rule_far_below_uniform():
  """On the synthetic progressions a masked token is fixed by its neighbours on both sides."""
  c = mlm_config('mlm', vocab=128)
  c.data.source = 'synthetic'
  c.train.steps = 300
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 20
  trainer = train.Trainer(c, '/tmp/unused', jax.devices()[:1])
  state = trainer.fresh_state()
  iterator = data.make_iterator(c, 'train')
  for _ in range(c.train.steps):
    state, _ = trainer.train_step(state, trainer.put(next(iterator)))
  result = trainer.evaluate(state.params, 4)
  assert result['eval_loss'] < 0.6 * np.log(128), result  # measured 2.30 vs log(128) = 4.85
  assert result['eval_accuracy'] > 0.3, result  # masked-token accuracy; measured 0.40
