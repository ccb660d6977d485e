"""Paged attention kernels (model.attention.PAGED_KERNELS) against an independent float64 computation, and the
engine's choice of kernel.

jax 0.10.2's ragged paged attention lowers only for TPU (neither Pallas interpreter runs it on CPU), so here its
adaptation to our rows is checked through jax's own jnp reference of the kernel (same inputs, same layout), and the
kernel itself by compiling the engine's step for a TPU target (tests/test_serve_aot.py).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from llm_jax.model import attention
from llm_jax.model.attention import PageTable


def _case(window):
  """A pool holding rows of different kinds: a prefill chunk after a cached prefix, a first chunk, two decode
  tokens, and a padding row placed between live rows."""
  rng = np.random.default_rng(0)
  page_size, num_pages, n, kv, h = 4, 16, 4, 2, 128  # GQA: 2 query heads per kv head
  pool = rng.standard_normal((num_pages, page_size, 2 * kv, h)).astype(np.float32)
  # (start, count, pages): rows of T=6 slots
  rows = [(5, 6, [3, 7, 2, 0]), (0, 3, [1, 0, 0, 0]), (9, 1, [4, 5, 6, 0]), (0, 0, [0, 0, 0, 0]), (13, 1, [8, 9, 10, 11])]
  t = 6
  positions = np.zeros((len(rows), t), np.int32)
  valid = np.zeros((len(rows), t), bool)
  for r, (start, count, _) in enumerate(rows):
    positions[r, :count] = np.arange(start, start + count)
    valid[r, :count] = True
  q = rng.standard_normal((len(rows), t, n, h)).astype(np.float32)
  table = np.array([p for _, _, p in rows], np.int32)
  return q, pool, table, positions, valid, page_size, num_pages


def _numpy_reference(q, pool, table, positions, valid, page_size, window, softcap=0.0):
  """float64: each real query against its row's keys at positions <= its own (within the window), logits
  soft-capped (cap * tanh(logits / cap)) when softcap > 0."""
  b, t, n, h = q.shape
  kv = pool.shape[2] // 2
  out = np.zeros(q.shape, np.float64)
  for r in range(b):
    for j in range(t):
      if not valid[r, j]:
        continue
      pos = positions[r, j]
      keys = [p for p in range(pos + 1) if not window or pos - p < window]
      slots = [(table[r, p // page_size], p % page_size) for p in keys]
      for head in range(n):
        g = head // (n // kv)
        k = np.array([pool[pg, off, 2 * g] for pg, off in slots], np.float64)
        v = np.array([pool[pg, off, 2 * g + 1] for pg, off in slots], np.float64)
        logits = k @ q[r, j, head].astype(np.float64) / np.sqrt(h)
        if softcap:
          logits = softcap * np.tanh(logits / softcap)
        w = np.exp(logits - logits.max())
        out[r, j, head] = (w / w.sum()) @ v
  return out


@pytest.mark.parametrize('window, softcap', [(0, 0.0), (3, 0.0), (3, 2.0)])
def test_paged_kernels_equal_float64(window, softcap):
  q, pool, table, positions, valid, page_size, num_pages = _case(window)
  pages = PageTable(jnp.asarray(table), page_size, num_pages)
  expected = _numpy_reference(q, pool, table, positions, valid, page_size, window, softcap)
  if softcap:  # the cap matters at these logits (|q.k| / sqrt(H) reaches several units)
    assert np.max(np.abs(expected - _numpy_reference(q, pool, table, positions, valid, page_size, window))) > 1e-2
  args = (jnp.asarray(q), jnp.asarray(pool), pages, jnp.asarray(positions), jnp.asarray(valid), window, softcap)
  xla = np.asarray(attention.paged_xla_attention(*args))
  ragged = np.asarray(attention.paged_ragged_attention(*args, reference=True))
  mask = valid[:, :, None, None]
  np.testing.assert_allclose(np.where(mask, xla, 0), expected, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(ragged, expected, atol=2e-5, rtol=1e-5)  # padding comes back as zeros


@pytest.mark.parametrize('window, softcap', [(0, 0.0), (3, 0.0), (3, 2.0)])
@pytest.mark.parametrize('pages_per_block', [1, 2, 4])
def test_blocked_kernel_equals_float64(window, softcap, pages_per_block, monkeypatch):
  """The online softmax over blocks of pages: one block (the whole table), two, and a page a time (so a row's
  keys span several folds, some fully masked; under the window the loop starts past the first block)."""
  q, pool, table, positions, valid, page_size, num_pages = _case(window)
  monkeypatch.setattr(attention, '_pages_per_block', lambda *_: pages_per_block)
  expected = _numpy_reference(q, pool, table, positions, valid, page_size, window, softcap)
  out = jax.jit(attention.paged_blocked_attention, static_argnums=(5, 6))(
      jnp.asarray(q), jnp.asarray(pool), PageTable(jnp.asarray(table), page_size, num_pages), jnp.asarray(positions),
      jnp.asarray(valid), window, softcap)
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-5)  # padding comes back as zeros


def test_blocked_kernel_block_sizes():
  assert attention._pages_per_block(64, 16, 1) == 2  # decode: 32 keys a block
  assert attention._pages_per_block(64, 16, 32) == 4  # a 32-token chunk: 64 keys
  assert attention._pages_per_block(64, 16, 512) == 8  # at most 128 keys
  assert attention._pages_per_block(6, 16, 64) == 6  # a divisor of the table's width
  assert attention._pages_per_block(7, 16, 64) == 7
  assert attention._pages_per_block(8, 256, 1) == 1  # pages larger than a block: one page


def test_ragged_layout_packs_live_rows_first():
  _, _, _, positions, valid, _, _ = _case(0)
  order, dest, kv_lens, cu_q_lens, num_seqs = (np.asarray(x) for x in attention._ragged_layout(
      jnp.asarray(positions), jnp.asarray(valid)))
  assert order.tolist() == [0, 1, 2, 4, 3] and num_seqs.tolist() == [4]
  assert kv_lens.tolist() == [11, 3, 10, 14, 0] and cu_q_lens.tolist() == [0, 6, 9, 10, 11, 11]
  assert dest[4, 0] == 10 and dest[3, 0] == dest.size  # padding is dropped from the packed queries


def test_interleaved_pool_layout():
  k = jnp.arange(2 * 3 * 4).reshape(2, 3, 4)
  v = -k
  kv = attention.interleave_kv(k, v)
  assert kv.shape == (2, 6, 4)
  np.testing.assert_array_equal(kv[:, 0::2], k)
  np.testing.assert_array_equal(kv[:, 1::2], v)


def test_choose_paged_kernel():
  assert attention.choose_paged_kernel('auto', 128, 'tpu') == 'ragged'
  assert attention.choose_paged_kernel('auto', 64, 'tpu') == 'xla'
  assert attention.choose_paged_kernel('auto', 128, 'gpu') == 'xla'
  assert attention.choose_paged_kernel('auto', 128, 'cpu') == 'blocked'
  assert attention.choose_paged_kernel('xla', 128, 'tpu') == 'xla'
  assert set(attention.PAGED_CHOICES) == {'auto', *attention.PAGED_KERNELS}


def _tiny_model(window=0):
  from llm_jax.model import Transformer, TransformerConfig
  cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                          max_seq_len=64, sliding_window=window, attention='xla', scan_layers=False)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = Transformer(cfg).init(jax.random.key(1), tokens)['params']
  # larger weights than the init's 0.02, so the greedy tokens depend on the context
  params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)
  return cfg, params


def _full_forward_greedy(cfg, params, prompt, steps):
  """The reference: the whole sequence (padded at the end to one length, so one compile) through the plain,
  non-paged model; argmax at the last real position."""
  from llm_jax.model import Transformer
  forward = jax.jit(lambda tokens: Transformer(cfg).apply({'params': params}, tokens))
  tokens = list(prompt)
  for _ in range(steps):
    logits = forward(jnp.asarray([tokens + [0] * (32 - len(tokens))], jnp.int32))
    tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
  return tokens[len(prompt):]


@pytest.mark.slow  # 47-52 s on the 2 shared cores at load 13 (several of the engine's step shapes compile)
def test_engine_greedy_on_the_interleaved_pool_equals_the_full_forward():
  """Chunked prefill (max_chunk 4 < the prompts), a sliding window shorter than the prompts, a second request
  that takes the first's full prompt page from the prefix cache."""
  from llm_jax.serving.engine import Engine, EngineConfig
  from llm_jax.serving.sampling import SamplingParams
  cfg, params = _tiny_model(window=5)
  engine = Engine(cfg, params, config=EngineConfig(page_size=8, num_pages=8, max_seqs=2, max_chunk=4,
                                                   max_prefill_tokens=4, attention='auto'))
  assert engine.attention == 'blocked'  # auto on CPU; the window makes its loop start past the first block
  rng = np.random.default_rng(0)
  shared = rng.integers(0, 64, 8).tolist()
  greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
  for prompt in (shared + rng.integers(0, 64, 3).tolist(), shared + rng.integers(0, 64, 2).tolist()):
    [output] = engine.generate([prompt], greedy)
    assert output.outputs[0].token_ids == _full_forward_greedy(cfg, params, prompt, 4)
  assert engine.stats()['prefix_cache_hit_tokens'] == 8


def test_engine_refuses_the_tpu_kernel_elsewhere():
  from llm_jax.serving.engine import Engine, EngineConfig, RequestError
  cfg, params = _tiny_model()
  with pytest.raises(RequestError, match='engine.attention'):
    Engine(cfg, params, config=EngineConfig(num_pages=8, attention='ragged'))
  with pytest.raises(RequestError, match="engine.attention: 'flash' is not one of auto, xla, blocked, ragged"):
    Engine(cfg, params, config=EngineConfig(num_pages=8, attention='flash'))
