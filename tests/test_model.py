"""The model against an independent float64 numpy forward pass; dtypes; scan/remat equivalence; packing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import metrics
from llm_jax.model import Transformer, TransformerConfig

SMALL = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48, max_seq_len=32,
             rope_theta=5000.0, dtype='float32')


def _init(cfg, tokens):
  return nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens))['params']


def _layer(params, i, scanned):
  return jax.tree.map(lambda x: x[i], params['layers']) if scanned else params[f'layers_{i}']


def numpy_forward(params, cfg: TransformerConfig, tokens, segment_ids, positions):
  """Float64 reference written from the LLaMA paper's equations, sharing no code with the model."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  h_dim = cfg.d_model // cfg.num_heads
  group = cfg.num_heads // cfg.num_kv_heads

  def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  def rope(x):  # [B,T,N,H], rotate-half pairs (i, i + H/2)
    inv = cfg.rope_theta ** (-np.arange(0, h_dim, 2) / h_dim)
    ang = positions[..., None] * inv
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    a, b = x[..., :h_dim // 2], x[..., h_dim // 2:]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)

  x = p['embed']['embedding'][tokens]
  t = tokens.shape[1]
  allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & np.tril(np.ones((t, t), bool))
  for i in range(cfg.num_layers):
    lp = _layer(p, i, cfg.scan_layers)
    h = rms(x, lp['attn_norm']['scale'])
    q = rope(np.einsum('btd,dnh->btnh', h, lp['attn']['q']['kernel']))
    k = rope(np.einsum('btd,dkh->btkh', h, lp['attn']['k']['kernel']))
    v = np.einsum('btd,dkh->btkh', h, lp['attn']['v']['kernel'])
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(h_dim)
    logits = np.where(allowed[:, None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = np.einsum('bnts,bsnh->btnh', w, v)
    x = x + np.einsum('btnh,nhd->btd', attn, lp['attn']['o']['kernel'])
    h = rms(x, lp['mlp_norm']['scale'])
    gate = h @ lp['mlp']['gate']['kernel']
    x = x + (gate / (1 + np.exp(-gate)) * (h @ lp['mlp']['up']['kernel'])) @ lp['mlp']['down']['kernel']
  x = rms(x, p['final_norm']['scale'])
  head = p['embed']['embedding'].T if cfg.tie_embeddings else p['lm_head']['kernel']
  return x @ head


def _packed_inputs(batch=2, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, SMALL['vocab_size'], (batch, t)).astype(np.int32)
  segment_ids = np.ones((batch, t), np.int32)
  segment_ids[:, 6:] = 2
  segment_ids[1, 11:] = 3
  positions = np.zeros((batch, t), np.int32)
  for b in range(batch):
    for s in np.unique(segment_ids[b]):
      idx = np.where(segment_ids[b] == s)[0]
      positions[b, idx] = np.arange(len(idx))
  return tokens, segment_ids, positions


@pytest.mark.parametrize('scan', [True, False])
@pytest.mark.parametrize('tie', [False, True])
def test_forward_matches_float64_numpy(scan, tie):
  cfg = TransformerConfig(**SMALL, scan_layers=scan, tie_embeddings=tie, attention='xla')
  tokens, segment_ids, positions = _packed_inputs()
  params = _init(cfg, tokens)
  got = Transformer(cfg).apply({'params': params}, tokens, segment_ids, positions)
  want = numpy_forward(params, cfg, tokens, segment_ids, positions)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_shapes_and_gradients():
  cfg = TransformerConfig(**SMALL)
  tokens, segment_ids, positions = _packed_inputs(batch=3, t=10)
  params = _init(cfg, tokens)
  logits = Transformer(cfg).apply({'params': params}, tokens, segment_ids, positions)
  assert logits.shape == (3, 10, SMALL['vocab_size'])

  def loss(p):
    out = Transformer(cfg).apply({'params': p}, tokens, segment_ids, positions)
    return jnp.mean(jax.nn.logsumexp(out, -1))

  grads = jax.grad(loss)(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    assert g.shape == p.shape and bool(jnp.all(jnp.isfinite(g)))


def test_params_float32_compute_bfloat16():
  cfg = TransformerConfig(**dict(SMALL, dtype='bfloat16'))
  tokens, segment_ids, positions = _packed_inputs()
  params = _init(cfg, tokens)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  jaxpr = jax.make_jaxpr(lambda p: Transformer(cfg).apply({'params': p}, tokens, segment_ids, positions))(params)
  dots = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == 'dot_general']
  dots += [e for eqn in jaxpr.eqns for sub in jax.core.jaxprs_in_params(eqn.params) for e in sub.eqns
           if e.primitive.name == 'dot_general']
  assert dots, 'no matmul found in the forward pass'
  for eqn in dots:  # every projection multiplies bfloat16 operands
    if all(v.aval.ndim >= 2 and v.aval.shape[-1] > 1 for v in eqn.invars):
      assert {v.aval.dtype for v in eqn.invars} == {jnp.dtype('bfloat16')}, eqn


def _scan_params(unscanned, num_layers):
  scanned = {k: v for k, v in unscanned.items() if not k.startswith('layers_')}
  scanned['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[unscanned[f'layers_{i}'] for i in range(num_layers)])
  return scanned


@pytest.mark.parametrize('remat', ['none', 'full', 'save_matmuls', 'save_attention_out', 'minimal_with_context'])
def test_scan_and_remat_give_same_loss_and_grads(remat):
  tokens, segment_ids, positions = _packed_inputs()
  base_cfg = TransformerConfig(**SMALL, scan_layers=False, remat='none')
  params = _init(base_cfg, tokens)

  def loss_and_grads(cfg, p):
    def loss(p):
      out = Transformer(cfg).apply({'params': p}, tokens, segment_ids, positions)
      return jnp.mean(jax.nn.log_softmax(out)[..., 0])
    return jax.value_and_grad(loss)(p)

  ref_loss, ref_grads = loss_and_grads(base_cfg, params)
  for scan in (False, True):
    cfg = TransformerConfig(**SMALL, scan_layers=scan, remat=remat)
    p = _scan_params(params, SMALL['num_layers']) if scan else params
    loss, grads = loss_and_grads(cfg, p)
    if scan:
      grads = {**{k: v for k, v in grads.items() if k != 'layers'},
               **{f'layers_{i}': jax.tree.map(lambda x: x[i], grads['layers']) for i in range(SMALL['num_layers'])}}
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


def test_packed_documents_do_not_see_each_other():
  cfg = TransformerConfig(**SMALL)
  tokens, segment_ids, positions = _packed_inputs()
  params = _init(cfg, tokens)
  apply = lambda t: np.asarray(Transformer(cfg).apply({'params': params}, t, segment_ids, positions))
  changed = tokens.copy()
  changed[:, 0:6] = (changed[:, 0:6] + 5) % SMALL['vocab_size']  # edit document 1 of every row
  before, after = apply(tokens), apply(changed)
  doc1 = segment_ids == 1
  assert not np.allclose(before[doc1], after[doc1])
  np.testing.assert_array_equal(before[~doc1], after[~doc1])


def test_7b_parameter_count_without_allocating():
  config = config_lib.load_experiment('7b')
  cfg = TransformerConfig.from_config(config)
  shapes = jax.eval_shape(lambda r: nn.unbox(Transformer(cfg).init(r, jnp.zeros((1, 8), jnp.int32))),
                          jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert count == 6_738_415_616
  assert count == metrics.total_params(config.model)


def test_pipeline_packing_keeps_documents_apart():
  """Batches packed by the data pipeline: editing one document moves only that document's logits and loss."""
  from llm_jax.data import pipeline
  cfg = TransformerConfig(**SMALL)
  rng = np.random.default_rng(1)
  eos = 1
  documents = [list(rng.integers(4, SMALL['vocab_size'], n)) for n in (7, 12, 5, 9)]
  batch = pipeline.pack_documents(documents, seq_len=32, eos_id=eos)
  edited_docs = [documents[0], list((np.array(documents[1]) + 3) % SMALL['vocab_size']), *documents[2:]]
  edited = pipeline.pack_documents(edited_docs, seq_len=32, eos_id=eos)
  params = _init(cfg, batch['inputs'])

  def run(b):
    logits = Transformer(cfg).apply({'params': params}, b['inputs'], b['segment_ids'], b['positions'])
    return np.asarray(logits)

  segments = batch['segment_ids']
  np.testing.assert_array_equal(segments, edited['segment_ids'])
  assert set(np.unique(segments)) >= {1, 2, 3, 4}
  before, after = run(batch), run(edited)
  second = segments == 2
  assert not np.allclose(before[second], after[second])
  np.testing.assert_array_equal(before[~second], after[~second])
