"""cuDNN attention without a dense mask: the packed lengths/offsets layout, its reference, and the dispatch.

The cuDNN kernels cannot run on a CPU. What can be checked here: (1) the packed layout built from segment ids,
through a plain-jnp kernel with cuDNN's lengths/offsets semantics, gives exactly the dense-mask result for random
packings (padding rows, single-token documents, rows over the cap); (2) the per-batch dispatch picks the right
kernel; (3) the cuDNN path traces on the installed jax with the arguments its custom call takes (one-run rows:
no bias; packed rows: int32 lengths [B,M] and offsets [B,M+1], padding-causal; the dense mask only as fallback).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.model import attention as attn


def _random_segments(rng, batch, length, max_docs):
  """Rows of documents with random lengths (1-token documents included), some with trailing padding (id 0),
  one row all padding, one row a single document."""
  rows = []
  for r in range(batch):
    if r == 0:
      rows.append(np.zeros(length, np.int32))
      continue
    if r == 1:
      rows.append(np.ones(length, np.int32))
      continue
    docs = int(rng.integers(1, max_docs + 1))
    cuts = np.sort(rng.choice(np.arange(1, length), size=min(docs, length - 1), replace=False))
    row = np.zeros(length, np.int32)
    for i, (start, end) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, length])):
      row[start:end] = i + 1
    if rng.random() < 0.5:  # trailing padding
      row[int(rng.integers(length // 2, length)):] = 0
    rows.append(row)
  return np.stack(rows)


def _numpy_runs(row):
  """(lengths, starts) of the runs of equal ids, written independently of attention.pack_segments."""
  starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1]]
  ends = starts[1:] + [len(row)]
  return [e - s for s, e in zip(starts, ends)], starts


def _qkv(rng, batch, length, heads=4, kv_heads=2, head_dim=8):
  shape = lambda n: (batch, length, n, head_dim)
  return tuple(jnp.asarray(rng.standard_normal(shape(n)), jnp.float32) for n in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize('causal', [True, False])
def test_packed_reference_equals_the_dense_mask_for_random_packings(causal):
  rng = np.random.default_rng(0)
  length, cap = 24, 12
  for _ in range(5):
    segments = _random_segments(rng, 6, length, max_docs=cap - 1)
    layout = attn.pack_segments(jnp.asarray(segments), cap)
    for b, row in enumerate(segments):
      lengths, starts = _numpy_runs(row)
      runs = len(lengths)
      assert int(layout.num_runs[b]) == runs
      np.testing.assert_array_equal(layout.seqlens[b], lengths + [-1] * (cap - runs))
      np.testing.assert_array_equal(layout.offsets[b], starts + [-1] * (cap + 1 - runs))
    q, k, v = _qkv(rng, *segments.shape)
    info = attn.MaskInfo(jnp.asarray(segments), jnp.asarray(segments), causal)
    np.testing.assert_array_equal(attn.packed_mask(layout, length, causal), info.dense())
    np.testing.assert_array_equal(attn.packed_reference_attention(q, k, v, layout, causal),
                                  attn.xla_attention(q, k, v, info))


def test_a_query_in_no_run_gives_zero():
  layout = attn.PackedSegments(seqlens=jnp.array([[3, -1]], jnp.int32), offsets=jnp.array([[0, -1, -1]], jnp.int32),
                               num_runs=jnp.array([1], jnp.int32))
  q, k, v = _qkv(np.random.default_rng(1), 1, 5)
  out = attn.packed_reference_attention(q, k, v, layout, causal=True)
  assert np.all(np.asarray(out[0, 3:]) == 0) and np.all(np.isfinite(out))
  assert np.any(np.asarray(out[0, :3]) != 0)


def _reference_kernels(causal, calls):
  """The three kernels of cudnn_attention, in plain jnp, recording which one ran (via a host callback)."""
  def record(name):
    jax.debug.callback(lambda: calls.append(name))

  def single(q, k, v):
    record('single')
    length = q.shape[1]
    mask = jnp.ones((q.shape[0], length, length), bool)
    return attn._masked_attention(q, k, v, jnp.tril(mask) if causal else mask)

  def packed(q, k, v, layout):
    record('packed')
    return attn.packed_reference_attention(q, k, v, layout, causal)

  def dense_for(info):
    def dense(q, k, v):
      record('dense')
      return attn.xla_attention(q, k, v, info)
    return dense

  return single, packed, dense_for


@pytest.mark.parametrize('cap', [0, 1, 4])
def test_dispatch_is_exact_and_picks_the_cheapest_kernel(cap):
  rng = np.random.default_rng(2)
  length = 16
  one_each = np.array([[1] * length, [0] * length, [3] * length], np.int32)
  few = np.array([[1] * 5 + [2] * 9 + [0] * 2, [1] * length, [1] + [2] + [3] * 14], np.int32)
  many = np.array([[1, 2, 3, 4, 5, 6] + [7] * 10, [1] * length, [1] * length], np.int32)
  cases = {'one_each': one_each, 'few': few, 'many': many}
  for name, segments in cases.items():
    calls = []
    single, packed, dense_for = _reference_kernels(True, calls)
    info = attn.MaskInfo(jnp.asarray(segments), jnp.asarray(segments), True, max_segments=cap)
    q, k, v = _qkv(rng, *segments.shape)
    got = jax.jit(lambda q, k, v: attn.segment_dispatch(q, k, v, info, single=single, packed=packed,
                                                        dense=dense_for(info)))(q, k, v)
    jax.effects_barrier()
    # same masks, but compiled inside a switch: fusion may round differently in the last bit
    np.testing.assert_allclose(got, attn.xla_attention(q, k, v, info), rtol=1e-6, atol=1e-6)
    if cap == 0:
      want = 'dense'
    else:
      want = {'one_each': 'single', 'few': 'packed' if cap > 1 else 'dense', 'many': 'dense'}[name]
    assert calls == [want], (name, cap, calls)


@pytest.fixture
def traceable_cudnn(monkeypatch):
  """jax's cuDNN entry traced (not run) on a CPU: skip its device checks, which need a GPU."""
  fa = attn._cudnn_packed_api()
  if fa is None:
    pytest.skip('this jax has no packed cuDNN attention entry')
  monkeypatch.setattr(fa, 'check_cudnn_version', lambda: 90800)
  monkeypatch.setattr(fa, 'check_is_flash_attention', lambda *args, **kwargs: None)
  return fa


def _fwd_calls(jaxpr):
  from jax.extend.core import jaxprs_in_params
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith('dot_product_attention_fwd'):
      yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from _fwd_calls(sub)


def test_cudnn_path_passes_lengths_and_offsets_and_no_bias_on_the_fast_paths(traceable_cudnn):
  fa = traceable_cudnn
  b, t, cap = 2, 16, 4
  segments = jnp.array([[1] * 5 + [2] * 9 + [0] * 2, [1] * t], jnp.int32)
  info = attn.MaskInfo(segments, segments, True, max_segments=cap)
  q = jnp.ones((b, t, 4, 8), jnp.bfloat16)
  k = jnp.ones((b, t, 2, 8), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(attn.cudnn_attention(q, k, v, info).astype(jnp.float32))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k).jaxpr
  calls = {}
  for eqn in _fwd_calls(jaxpr):
    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    bias = (b, 1, t, t) in shapes
    packed = (b, cap) in shapes and (b, cap + 1) in shapes
    calls['dense' if bias else 'packed' if packed else 'single'] = eqn.params['mask_type']
  assert calls == {'single': fa.MaskType.CAUSAL, 'packed': fa.MaskType.PADDING_CAUSAL,
                   'dense': fa.MaskType.CAUSAL}, calls


def test_cudnn_with_no_cap_uses_the_dense_mask_only(traceable_cudnn):
  segments = jnp.ones((2, 16), jnp.int32)
  info = attn.MaskInfo(segments, segments, True, max_segments=0)
  q = jnp.ones((2, 16, 4, 8), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(functools.partial(attn.cudnn_attention, mask_info=info))(q, q, q).jaxpr
  shapes = [[tuple(v.aval.shape) for v in eqn.invars] for eqn in _fwd_calls(jaxpr)]
  assert len(shapes) == 1 and (2, 1, 16, 16) in shapes[0]


@pytest.mark.parametrize('remat,forward_calls', [('save_attention_out', 6), ('minimal_with_context', 3)])
def test_minimal_with_context_keeps_the_cudnn_forward_outputs(traceable_cudnn, remat, forward_calls):
  """The gradient of a scanned, rematerialised model on the cuDNN path: 3 forward kernels (one-run, packed,
  dense branch) when the policy saves the kernel's outputs and softmax statistics, 6 when the backward pass has
  to rerun them (a name on the attention output alone does not keep the statistics)."""
  from llm_jax.model import Transformer, TransformerConfig
  cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
                          max_seq_len=16, dtype='bfloat16', attention='cudnn', max_segments_per_row=4, remat=remat)
  tokens = jnp.zeros((2, 16), jnp.int32)
  segments = jnp.array([[1] * 5 + [2] * 11, [1] * 16], jnp.int32)
  model = Transformer(cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, segments))['params']
  loss = lambda p: jnp.sum(model.apply({'params': p}, tokens, segments))
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  assert len(list(_fwd_calls(jaxpr))) == forward_calls
