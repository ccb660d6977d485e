"""Decode speed of the KV-cache sampler, and what one cached step costs next to a full forward pass.

  JAX_PLATFORMS=cpu python benchmarks/decode_benchmark.py [--config=experiments/tiny.py] [--prompt_len=32]
      [--new_tokens=128] [--batch_sizes=1,16] [--repeats=3] [--workdir=DIR]

For each batch size B it reports
  decode_tokens_per_s    B * new_tokens / wall time of `decoding.generate` (prefill + jitted while_loop, greedy,
                         no EOS so every row generates all new_tokens), median of `repeats` runs after a warm-up
  cached_step_ms         one decode step: 1 token per row against a cache of prompt_len + new_tokens slots
  full_forward_ms        one forward pass over B rows of prompt_len + new_tokens tokens (what decoding without a
                         cache recomputes for every new token)
  cached_over_full       cached_step_ms / full_forward_ms
as one JSON line per batch size. Parameters are random (shapes are what matter) unless --workdir names a run, whose
config and latest checkpoint are then used. Runs on whatever backend JAX picks (CPU, GPU, TPU).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/tiny.py', 'Config whose model is measured.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Use this run\'s config and latest checkpoint instead of random '
                               'parameters.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens per row.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'Tokens generated per row.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '16'], 'Batch sizes to measure.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (the median is reported).')


def _median_seconds(fn, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn())  # warm-up: compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(cfg, params, batch_size: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from llm_jax import decoding
  from llm_jax.model import Transformer, init_cache

  rng = np.random.default_rng(0)
  prompts = rng.integers(4, cfg.vocab_size, size=(batch_size, prompt_len)).tolist()
  generate_s = _median_seconds(lambda: decoding.generate(cfg, params, prompts, new_tokens), repeats)

  total = prompt_len + new_tokens
  dcfg = decoding.decode_config(cfg)
  cache = init_cache(dcfg, batch_size, total)
  ones = jnp.ones((batch_size, 1), jnp.int32)
  position = jnp.full((batch_size, 1), prompt_len, jnp.int32)

  @jax.jit
  def cached_step(params, cache, token):  # [B,1] token against a [B,total] cache
    logits, variables = Transformer(dcfg, decode=True).apply({'params': params, 'cache': cache}, token, ones,
                                                             position, mutable=['cache'])
    return logits, variables['cache']

  @jax.jit
  def full_forward(params, tokens):  # [B,total] tokens, no cache
    return Transformer(dcfg).apply({'params': params}, tokens)

  tokens = jnp.asarray(rng.integers(4, cfg.vocab_size, size=(batch_size, total)), jnp.int32)
  step_s = _median_seconds(lambda: cached_step(params, cache, tokens[:, :1]), max(repeats, 20))
  full_s = _median_seconds(lambda: full_forward(params, tokens), max(repeats, 20))
  return dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind, batch_size=batch_size,
              prompt_len=prompt_len, new_tokens=new_tokens,
              decode_tokens_per_s=round(batch_size * new_tokens / generate_s, 1),
              cached_step_ms=round(1e3 * step_s, 3), full_forward_ms=round(1e3 * full_s, 3),
              cached_over_full=round(step_s / full_s, 4))


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from llm_jax.model import Transformer, TransformerConfig

  if _WORKDIR.value:
    from llm_jax import workdir as workdir_lib
    loaded = workdir_lib.load_workdir(_WORKDIR.value, need_tokenizer=False)
    cfg, params = loaded.model_config, loaded.params
  else:
    cfg = TransformerConfig.from_config(_CONFIG.value)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params']
  n_params = sum(x.size for x in jax.tree.leaves(params))
  for b in _BATCH_SIZES.value:
    row = measure(cfg, params, int(b), _PROMPT_LEN.value, _NEW_TOKENS.value, _REPEATS.value)
    print(json.dumps(dict(row, params=n_params, dtype=cfg.dtype)), flush=True)


if __name__ == '__main__':
  app.run(main)
