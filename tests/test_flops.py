"""The FLOPs-per-token formula (metrics.py) against an independent count: the matmuls in the traced step.

The count walks the jaxpr of the loss gradient (forward + backward) and adds 2*M*N*K for every dot_general,
whatever produced it (projections, attention scores and values, the output head, their transposes in the
backward pass). It never reads metrics.matmul_params.
"""

import math

import jax
import jax.numpy as jnp
import pytest

from llm_jax import config as config_lib
from llm_jax import metrics
from llm_jax import train


def _dot_flops(jaxpr) -> int:
  """2 * prod(batch dims) * M * N * K summed over every dot_general, recursing into sub-jaxprs (scan: x length)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (lhs_contract, _), (lhs_batch, _) = eqn.params['dimension_numbers']
      lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
      out = eqn.outvars[0].aval.shape
      contracted = math.prod(lhs[d] for d in lhs_contract)
      total += 2 * math.prod(out) * contracted  # out holds batch * M * N elements
      continue
    multiplier = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if hasattr(sub, 'eqns'):  # Jaxpr
          total += multiplier * _dot_flops(sub)
        elif hasattr(getattr(sub, 'jaxpr', None), 'eqns'):  # ClosedJaxpr
          total += multiplier * _dot_flops(sub.jaxpr)
  return total


def _small_config(**model):
  c = config_lib.get_config()
  c.model.update(dict(vocab_size=96, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_dim=48,
                      max_seq_len=16, dtype='float32', attention='xla'))
  c.model.update(model)
  c.data.seq_len = 16
  c.data.global_batch_size = 2
  return c


def _counted_flops_per_token(config) -> float:
  model = train.create_model(config)
  params = train.abstract_params(config, model)
  b, t = config.data.global_batch_size, config.data.seq_len
  ints = jax.ShapeDtypeStruct((b, t), jnp.int32)
  batch = dict(inputs=ints, targets=ints, segment_ids=ints, positions=ints,
               loss_mask=jax.ShapeDtypeStruct((b, t), jnp.float32))
  grad = jax.grad(lambda p, x: train.loss_sum(p, x, model))
  jaxpr = jax.make_jaxpr(grad)(params, batch)
  return _dot_flops(jaxpr.jaxpr) / (b * t)


def _hand_count(c) -> int:
  """Per token, forward: 2 FLOPs per weight of every projection, plus QK^T and PV over all T keys; x3 for
  forward + backward. Written from the architecture, not from metrics.py."""
  d, f, v, t, layers = c.d_model, c.ffn_dim, c.vocab_size, 16, c.num_layers
  hd = d // c.num_heads
  per_layer = (2 * d * c.num_heads * hd  # q
               + 2 * 2 * d * c.num_kv_heads * hd  # k, v
               + 2 * c.num_heads * hd * d  # o
               + 2 * 3 * d * f  # gate, up, down
               + 2 * 2 * t * c.num_heads * hd)  # scores and weighted values against every key
  return 3 * (layers * per_layer + 2 * d * v)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_bidirectional_formula_equals_counted_matmuls(scan_layers):
  # mlm attends to every key, so the formula's attention term (12*L*d*T) is the whole computation.
  config = _small_config(objective='mlm', scan_layers=scan_layers)
  counted = _counted_flops_per_token(config)
  assert counted == metrics.flops_per_token(config.model, config.data.seq_len)
  assert counted == _hand_count(config.model)


def test_causal_formula_counts_half_the_attention():
  # The xla kernel computes the full T x T scores and masks them; the convention counts only the causal half.
  config = _small_config(objective='clm')
  counted = _counted_flops_per_token(config)
  m, t = config.model, config.data.seq_len
  assert counted - metrics.flops_per_token(m, t) == 6 * m.num_layers * m.d_model * t


def test_tied_embeddings_count_the_output_projection_once():
  config = _small_config(objective='mlm', tie_embeddings=True)
  assert _counted_flops_per_token(config) == metrics.flops_per_token(config.model, config.data.seq_len)


def _preset(name):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'preset_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('name,d,layers,f,seq', [('1b', 2048, 16, 5632, 2048), ('7b', 4096, 32, 11008, 4096)])
def test_preset_flops_per_token_by_hand(name, d, layers, f, seq):
  config = _preset(name)
  n_matmul = layers * (4 * d * d + 3 * d * f) + 32000 * d
  assert metrics.flops_per_token(config.model, config.data.seq_len) == 6 * n_matmul + 6 * layers * d * seq
