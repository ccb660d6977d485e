"""Mixture of experts (llm_jax/model/moe.py): the router and the experts against a per-token numpy loop, the
dropless ragged_dot path against the dense one-hot reference (outputs and gradients, float32, 1e-5), the
balance and z losses through the objective's door, the config checks."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax import objectives
from llm_jax.model import moe
from llm_jax.model.transformer import Transformer, TransformerConfig

TOL = 1e-5  # float32: the two paths sum the same products in different orders


def _config(**model):
  c = config_lib.get_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48, max_seq_len=32,
                 dtype='float32', ffn='moe', num_experts=4, experts_per_token=2, expert_ffn_dim=24)
  c.model.update(**model)
  c.data.seq_len = 16
  return c


def _batch(seed=1, batch=2, seq=16):
  tokens = jax.random.randint(jax.random.key(seed), (batch, seq), 0, 64)
  segments = jnp.ones_like(tokens).at[1, -3:].set(0)  # padding at the end of row 1
  positions = jnp.broadcast_to(jnp.arange(seq), tokens.shape)
  return dict(inputs=tokens, targets=jnp.roll(tokens, -1, axis=1), segment_ids=segments, positions=positions,
              loss_mask=(segments > 0).astype(jnp.float32))


def _model(c, **overrides):
  cfg = dataclasses.replace(TransformerConfig.from_config(c), **overrides)
  return Transformer(cfg)


def _numpy_moe(x, p, k, norm_topk, shared=None):
  """Token by token, expert by expert: softmax router, top-k, optional renormalisation, SwiGLU experts."""
  silu = lambda v: v / (1 + np.exp(-v))
  out = np.zeros_like(x)
  for n, row in enumerate(x):
    logits = row @ p['router']['kernel']
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    chosen = np.argsort(-probs)[:k]
    weights = probs[chosen] / (probs[chosen].sum() if norm_topk else 1.0)
    for e, w in zip(chosen, weights):
      out[n] += w * ((silu(row @ p['gate'][e]) * (row @ p['up'][e])) @ p['down'][e])
    if shared is not None:
      s = shared
      gate = 1 / (1 + np.exp(-(row @ p['shared_gate']['kernel'])))
      out[n] += gate * ((silu(row @ s['gate']['kernel']) * (row @ s['up']['kernel'])) @ s['down']['kernel'])
  return out


@pytest.mark.parametrize('compute', ['ragged', 'dense'])
@pytest.mark.parametrize('norm_topk,shared', [(True, 0), (False, 16)])
def test_moe_layer_equals_a_per_token_loop(compute, norm_topk, shared):
  layer = moe.MoE(num_experts=4, experts_per_token=2, expert_ffn_dim=24, shared_ffn_dim=shared, norm_topk=norm_topk,
                  compute=compute)
  x = jax.random.normal(jax.random.key(0), (2, 8, 32))
  segments = jnp.ones((2, 8), jnp.int32)
  params = jax.tree.map(lambda v: v * 20, layer.init(jax.random.key(1), x, segments)['params'])  # sharp routing
  got = layer.apply({'params': params}, x, segments)
  p = jax.tree.map(np.asarray, nn_unbox(params))
  want = _numpy_moe(np.asarray(x).reshape(16, 32), p, 2, norm_topk, p.get('shared'))
  np.testing.assert_allclose(np.asarray(got).reshape(16, 32), want, rtol=1e-4, atol=TOL * np.abs(want).max())


def nn_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


@pytest.mark.slow
def test_ragged_equals_dense_reference_loss_and_gradients():
  c = _config(shared_expert_ffn_dim=16, router_z_loss_coef=1e-3)
  objective = objectives.make(c)
  batch = _batch()
  ragged, dense = _model(c), _model(c, moe_compute='dense')
  params = nn_unbox(ragged.init(jax.random.key(0), batch['inputs'])['params'])

  def value(model):
    count, tokens = objective.count(batch), objective.tokens(batch)
    return jax.jit(jax.value_and_grad(lambda p: objective.loss(model, p, batch).value(count, tokens)))(params)

  (loss_r, grad_r), (loss_d, grad_d) = value(ragged), value(dense)
  np.testing.assert_allclose(loss_r, loss_d, rtol=TOL)
  for a, b in zip(jax.tree.leaves(grad_r), jax.tree.leaves(grad_d)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=TOL * float(np.abs(b).max()))


def _terms_by_hand(model, params, batch, k=2):
  """(balance, z) from the routers' own logits (unscanned model), in float64 over the real tokens, mean over
  layers: E * sum_i f_i P_i and the mean of logsumexp(logits)^2."""
  captured = model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'],
                         capture_intermediates=lambda mdl, _: mdl.name == 'router', mutable=['intermediates'])[1]
  layers = sorted(name for name in captured['intermediates'] if name.startswith('layers_'))
  real = np.asarray(batch['segment_ids']).reshape(-1) > 0
  balance, z = [], []
  for name in layers:
    logits = np.asarray(captured['intermediates'][name]['mlp']['router']['__call__'][0], np.float64)[real]
    num_experts = logits.shape[-1]
    top_logit = logits.max(-1, keepdims=True)
    log_z = top_logit[:, 0] + np.log(np.exp(logits - top_logit).sum(-1))
    probs = np.exp(logits - log_z[:, None])
    top = np.argsort(-probs, axis=-1)[:, :k]
    f = np.array([(top == e).sum() for e in range(num_experts)]) / len(logits)
    balance.append(num_experts * np.sum(f * probs.mean(0)))
    z.append(np.mean(log_z ** 2))
  return np.mean(balance), np.mean(z)


def test_balance_loss_formula_and_its_balanced_value():
  c = _config(scan_layers=False)
  model, batch = _model(c), _batch()
  params = nn_unbox(model.init(jax.random.key(0), batch['inputs'])['params'])
  out = objectives.make(c).loss(model, params, batch)
  tokens = float(jnp.sum(batch['segment_ids'] > 0))
  # by hand from the routers' own logits: E * sum_i f_i P_i over the real tokens, mean over layers, times coef
  balance, _ = _terms_by_hand(model, params, batch)
  np.testing.assert_allclose(out.aux['moe_balance'] / tokens, 0.01 * balance, rtol=1e-5)
  # the door adds it to the differentiated value, divided by the real tokens (as the step does)
  np.testing.assert_allclose(out.value(1.0, tokens), out.metrics['loss'] + 0.01 * balance, rtol=1e-6)
  # a router that cannot tell experts apart (zero weights: uniform probabilities) gives exactly k
  r, _, load = moe.balance_terms(jnp.zeros((6, 4)), jnp.full((6, 4), 0.25), jnp.array([[0, 1], [2, 3]] * 3),
                                 jnp.ones(6))
  assert float(r) == pytest.approx(2.0) and np.allclose(load, 0.25)


def _pair_rows(rows=2, seq=16, seed=3):
  """Preference rows written by hand in the layout of llm_jax.objectives.preference: pair k of a row is segments
  2k-1 (prompt + chosen) and 2k (prompt + rejected), the loss mask on the completion targets, padding at the end.
  Two pairs a row, of 4 + 3 positions each: 14 real tokens and 6 answer targets a row."""
  tokens = np.asarray(jax.random.randint(jax.random.key(seed), (rows, seq + 1), 3, 64))
  segments, positions, mask = (np.zeros((rows, seq), dtype) for dtype in (np.int32, np.int32, np.float32))
  for r in range(rows):
    start = 0
    for segment, (length, answer) in enumerate([(4, 2), (3, 1), (4, 2), (3, 1)], start=1):
      segments[r, start:start + length] = segment
      positions[r, start:start + length] = np.arange(length)
      mask[r, start + length - answer:start + length] = 1
      start += length
  return dict(inputs=jnp.asarray(tokens[:, :-1]), targets=jnp.asarray(tokens[:, 1:]), segment_ids=jnp.asarray(segments),
              positions=jnp.asarray(positions), loss_mask=jnp.asarray(mask))


@pytest.mark.slow  # three train steps compiled
def test_aux_terms_are_a_mean_per_token_under_every_objective():
  """The train step divides the sown terms by the step's real tokens whatever the objective divides its loss by
  (on these rows: clm/SFT its 12 answer targets, mlm its masked positions, dpo its 4 pairs): under each objective
  aux/moe_balance and aux/router_z are coef * the per-token terms computed by hand from the routers' logits on the
  tokens the step saw, so a coefficient weighs as much under DPO as under pre-training (divided by DPO's pairs,
  the old normalisation, the balance term would be 28 / 4 = 7 times larger)."""
  from llm_jax import optim, train
  batch = _pair_rows()
  tokens = float(np.sum(batch['segment_ids'] > 0))
  seen, state = {}, None
  for objective in ('dpo', 'clm', 'mlm'):
    c = _config(scan_layers=False, attention='xla', objective=objective, router_z_loss_coef=1e-3)
    model, optimizer = _model(c), optim.make_optimizer(c.train)
    if state is None:  # dpo's: the same parameters with the frozen copy of them as the reference
      state = jax.jit(lambda key: nn_unbox(train.state_init_fn(c, model, optimizer)(key)))(jax.random.key(0))
    step = jax.jit(train.make_train_step(c, model, optimizer))
    _, metrics = step(state if objective == 'dpo' else state.replace(reference=None), batch)
    prepared = objectives.make(c).prepare(batch, 0)  # mlm: the masked inputs the step's model saw
    balance, z = _terms_by_hand(model, state.params, prepared)
    np.testing.assert_allclose(metrics['aux/moe_balance'], 0.01 * balance, rtol=1e-5, err_msg=objective)
    np.testing.assert_allclose(metrics['aux/router_z'], 1e-3 * z, rtol=1e-5, err_msg=objective)
    assert float(metrics['target_tokens']) < tokens / 2, objective  # the objective's own count is another number
    seen[objective] = float(metrics['aux/moe_balance'])
  assert seen['clm'] == pytest.approx(seen['dpo'], rel=1e-6)  # the same tokens, the same term
  assert 0.01 * 1.9 < seen['dpo'] < 0.01 * 2.5  # k = 2 for balanced routing, from an initial router near it


@pytest.mark.slow
def test_scanned_and_unrolled_moe_give_the_same_loss_and_aux_terms():
  c = _config(router_z_loss_coef=1e-3)
  batch = _batch()
  scanned, unrolled = _model(c), _model(c, scan_layers=False)
  params = nn_unbox(scanned.init(jax.random.key(0), batch['inputs'])['params'])
  layers = params.pop('layers')
  unrolled_params = dict(params, **{f'layers_{i}': jax.tree.map(lambda v, i=i: v[i], layers) for i in range(2)})
  params['layers'] = layers
  objective = objectives.make(c)
  a, b = objective.loss(scanned, params, batch), objective.loss(unrolled, unrolled_params, batch)
  np.testing.assert_allclose(a.metrics['loss'], b.metrics['loss'], rtol=1e-5)
  for name in ('moe_balance', 'router_z'):
    np.testing.assert_allclose(a.aux[name], b.aux[name], rtol=1e-5)
  load = moe.expert_load(scanned, params, batch)
  assert load.shape == (2, 4) and np.allclose(np.sum(load, axis=1), 1.0, atol=1e-6)


def test_dense_models_sow_nothing():
  c = _config(ffn='dense')
  model, batch = _model(c), _batch()
  params = nn_unbox(jax.eval_shape(model.init, jax.random.key(0), batch['inputs'])['params'])  # shapes: no compile
  assert 'router' not in params['layers']['mlp']
  _, terms = jax.eval_shape(lambda p, b: objectives.apply_with_aux(model, p, b), params, batch)
  assert terms == {}


@pytest.mark.parametrize('field,value,message', [
    ('ffn', 'sparse', 'config.model.ffn: unknown value'),
    ('num_experts', 1, 'config.model.num_experts'),
    ('experts_per_token', 5, 'config.model.experts_per_token'),
    ('moe_compute', 'fused', 'config.model.moe_compute'),
    ('router_aux_loss_coef', -1.0, 'config.model.router_aux_loss_coef'),
])
def test_config_errors_name_the_field(field, value, message):
  c = _config(**{field: value})
  with pytest.raises(config_lib.ConfigError, match=message):
    validation.validate(c, 1)


def test_lora_on_experts_is_refused_but_attention_adapters_work():
  c = _config()
  c.lora.rank, c.lora.targets = 4, 'q,gate'
  with pytest.raises(config_lib.ConfigError, match='config.lora.targets: gate'):
    validation.validate(c, 1)
  c.lora.targets = 'q,v'
  validation.validate(c, 1)
  model, batch = _model(c), _batch()
  params = nn_unbox(jax.eval_shape(model.init, jax.random.key(0), batch['inputs'])['params'])
  assert 'lora_a' in params['layers']['attn']['q'] and 'lora_a' not in params['layers']['attn']['k']


def test_aux_collection_name_is_the_objectives():
  assert moe.AUX_COLLECTION == objectives.AUX_COLLECTION


def _dot_flops(jaxpr) -> int:
  """2 * multiply-adds of every dot_general and ragged_dot_general in a jaxpr (scan bodies x length). A ragged dot
  whose output gains the group axis (the experts' weight gradient) does each group's rows once: / groups."""
  import math
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ('dot_general', 'ragged_dot_general'):
      numbers = eqn.params['ragged_dot_dimension_numbers'].dot_dimension_numbers if name != 'dot_general' else \
          eqn.params['dimension_numbers']
      lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
      macs = math.prod(out) * math.prod(lhs[d] for d in numbers[0][0])
      if name == 'ragged_dot_general' and not eqn.params['ragged_dot_dimension_numbers'].rhs_group_dimensions:
        macs //= eqn.invars[2].aval.shape[0]
      total += 2 * macs
      continue
    multiplier = eqn.params.get('length', 1) if name == 'scan' else 1
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if hasattr(sub, 'eqns'):
          total += multiplier * _dot_flops(sub)
        elif hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          total += multiplier * _dot_flops(sub.jaxpr)
  return total


@pytest.mark.parametrize('shared', [0, 16])
def test_flops_per_token_counts_the_active_experts(shared):
  """6 * active matmul weights + attention = the dots of the traced gradient (ragged path: k experts a token).
  The dense reference runs all E experts: the same formula with E in place of k. The xla kernel computes the whole
  causal score matrix, which the formula halves (as tests/test_flops.py): 6 * L * D * T more in the count."""
  from llm_jax import metrics, train
  c = _config(shared_expert_ffn_dim=shared, attention='xla', num_experts=8, experts_per_token=2)
  c.model.max_seq_len = c.data.seq_len = 16
  b, t = 2, 16

  def counted(config):
    model = train.create_model(config)
    params = train.abstract_params(config, model)
    ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch = dict(inputs=ints, targets=ints, segment_ids=ints, positions=ints,
                 loss_mask=jax.ShapeDtypeStruct((b, t), jnp.float32))
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: train.loss_sum(p, x, model)))(params, batch)
    return _dot_flops(jaxpr.jaxpr) / (b * t)

  full_attention = 6 * c.model.num_layers * c.model.d_model * t
  assert counted(c) == metrics.flops_per_token(c.model, t) + full_attention
  dense = c.copy_and_resolve_references()
  dense.model.moe_compute = 'dense'
  every_expert = c.copy_and_resolve_references()
  every_expert.model.experts_per_token = 8
  assert counted(dense) == metrics.flops_per_token(every_expert.model, t) + full_attention
  # stored parameters: every expert, counted from the parameter tree
  stored = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(train.abstract_params(c)))
  assert metrics.total_params(c.model) == stored


def test_presets_moe_tiny_matches_tiny_per_token_and_mixtral_has_its_size():
  from llm_jax import metrics
  tiny, sparse = config_lib.load_experiment('tiny').model, config_lib.load_experiment('moe_tiny').model
  router = sparse.num_layers * sparse.d_model * sparse.num_experts
  assert metrics.matmul_params(sparse) - metrics.matmul_params(tiny) == router  # same active FFN weights
  mixtral = config_lib.load_experiment('mixtral_8x7b')
  assert metrics.total_params(mixtral.model) == 46_702_792_704  # Mixtral-8x7B's published count
  assert validation.validate(mixtral, 32) == {'data': 1, 'expert': 8, 'fsdp': 4, 'context': 1, 'tensor': 1}  # v5p-64: 32 chips


def test_log_steps_carry_the_per_layer_expert_load(tmp_path):
  """A training run's train rows: expert_load [num_layers][num_experts] of the logged step's batch, rows summing
  to 1, equal to moe.expert_load recomputed (unjitted) on that step's parameters and batch by a hook."""
  from llm_jax import train  # the loop; this file otherwise tests the model alone
  c = _config(attention='xla')
  c.data.update(source='synthetic', global_batch_size=8)
  c.train.update(steps=4, learning_rate=1e-2, warmup_steps=1, log_every=2)
  c.eval.update(every=0, steps=1)
  c.checkpoint.update(every=0)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  seen = {}

  def recompute(loop, step):
    model = _model(c)
    seen[step] = np.asarray(moe.expert_load(model, jax.device_get(loop.state.params), jax.device_get(loop.last_batch)))

  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir, devices=jax.devices()[:1], hooks=[train.every(2, recompute)])
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [2, 4] and sorted(seen) == [2, 4]
  for row in train_rows:
    load = np.array(row['expert_load'])
    assert load.shape == (2, 4)
    np.testing.assert_allclose(load.sum(axis=1), 1.0, atol=1e-3)  # rounded to 4 digits in the row
    np.testing.assert_allclose(load, seen[row['step']], atol=1e-4)
    assert row['expert_load_min'] == pytest.approx(seen[row['step']].min(), abs=1e-6)
    assert row['expert_load_max'] == pytest.approx(seen[row['step']].max(), abs=1e-6)
