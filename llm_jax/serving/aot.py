"""Compile-only check of the serving engine's steps: `python -m llm_jax.serve_dry_run --config=... --target=...`.

Compiles the engine's jitted step (`engine._forward_and_sample`: the model over the page pool, then the sampler)
for a decode bucket (`rows` x 1 token over `max_model_len` of context) and a prefill bucket (1 x `prefill`
tokens), from abstract inputs only (ShapeDtypeStructs with the engine's shardings: parameters split by the rules
table, the pool over the kv heads, rows whole), for this host's devices or a target's compile-only devices
(llm_jax/targets.py). Reports per device: the memory of each compiled step, the parameters, the pool, how many
pages of `page_size` tokens fit beside the parameters and the larger step's other buffers, and the attention
kernel the compiled HLO runs (llm_jax/hlo_analysis.py: 'ragged_paged' for jax's TPU kernel, 'dense' for the xla
gather path).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import hlo_analysis
from llm_jax import runtime
from llm_jax import sharding
from llm_jax import targets as targets_lib
from llm_jax.model import Transformer, TransformerConfig, attention
from llm_jax.serving import engine as engine_lib
from llm_jax.serving.sampling import RowSettings

GIB = 1024 ** 3


def _memory(compiled) -> dict[str, int]:
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  peak = getattr(mem, 'peak_memory_in_bytes', 0) or 0
  return dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
              alias=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
              generated_code=mem.generated_code_size_in_bytes, total=total,
              peak=peak + mem.generated_code_size_in_bytes if peak else total)


def _per_device_bytes(tree) -> int:
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree))


def analyze(config, target: str | None = None, devices=None, rows: int = 32, prefill: int = 512,
            page_size: int = 16, max_model_len: int = 0, attention_name: str = 'auto',
            num_pages: int = 0) -> dict[str, Any]:
  """Compiles the decode and prefill steps; returns memory per device, pages that fit, kernels found."""
  t0 = time.perf_counter()
  spec = targets_lib.get(target) if target else None
  devices = spec.devices() if spec is not None else (devices or jax.devices())
  mesh = sharding.make_mesh(config, devices)
  platform = attention.platform_of(mesh.devices.flat)
  rules = sharding.rules_of(config)
  engine_rules = tuple((name, None if name == 'act_batch' else axes) for name, axes in rules)  # as Engine
  model_config = dataclasses.replace(TransformerConfig.from_config(config), scan_layers=False, remat='none',
                                     attention='xla', platform=platform)
  max_model_len = min(max_model_len or config.data.seq_len, model_config.max_seq_len)
  kernel = engine_lib.paged_kernel(attention_name, model_config, platform, mesh, engine_rules)
  params = runtime.abstract_params(config, Transformer(model_config), mesh)
  model = Transformer(model_config, decode=True)
  pages_per_seq = -(-max_model_len // page_size)
  pool_shapes = _pool_shapes(model, page_size, 2)
  page_bytes = _per_device_bytes(_abstract_pool(pool_shapes, 1, mesh, engine_rules))  # one page, per device
  params_bytes = _per_device_bytes(params)
  usable = spec.memory_gib * GIB * spec.usable_fraction if spec is not None else None
  if not num_pages:  # what the engine wants for `rows` full-length sequences, capped by what the weights leave
    num_pages = rows * pages_per_seq + 1
    if usable is not None:
      num_pages = max(2, min(num_pages, int((usable - params_bytes) * 0.9 // page_bytes)))
  pool = _abstract_pool(pool_shapes, num_pages, mesh, engine_rules)
  step = engine_lib._compiled_step(model.cfg, engine_rules, mesh)  # the very function the engine runs
  statics = dict(page_size=page_size, num_pages=num_pages, kernel=kernel, vocab_limit=model_config.vocab_size,
                 num_logprobs=0, prompt_logprobs=-1, sampled=True, filtered=True, penalised=False)
  t1 = time.perf_counter()
  steps = {}
  for name, (b, t, wide) in dict(decode=(rows, 1, pages_per_seq),
                                 prefill=(1, prefill, -(-prefill // page_size))).items():
    start = time.perf_counter()
    compiled = step.lower(params, pool, *_abstract_batch(b, t, wide, mesh), **statics).compile()
    memory = _memory(compiled)
    steps[name] = dict(rows=b, tokens=t, page_table_width=wide, memory_per_device_bytes=memory,
                       attention_kernels=hlo_analysis.analyze(compiled)['attention_kernels'],
                       compile_seconds=round(time.perf_counter() - start, 2))
  pool_bytes = _per_device_bytes(pool)
  # Besides the pool: the weights, the batch, the step's temporaries and code (the larger of the two steps).
  other = max(s['memory_per_device_bytes']['peak'] for s in steps.values()) - pool_bytes
  pages_fit = int((usable - other) // page_bytes) if usable is not None else None
  return dict(
      target=spec.name if spec is not None else None, platform=platform, num_devices=mesh.size,
      device_kind=mesh.devices.flat[0].device_kind, mesh=dict(mesh.shape), kernel=kernel, page_size=page_size,
      max_model_len=max_model_len, dtype=model_config.dtype, param_dtype=model_config.param_dtype,
      params_gb_per_device=params_bytes / GIB, page_bytes_per_device=page_bytes, num_pages_compiled=num_pages,
      pool_gb_per_device=pool_bytes / GIB, usable_memory_gb=usable / GIB if usable is not None else None,
      pages_fit=pages_fit, tokens_fit=pages_fit * page_size if pages_fit is not None else None,
      fits=(other + pool_bytes <= usable) if usable is not None else None, steps=steps,
      seconds=dict(setup=round(t1 - t0, 2), compile=round(time.perf_counter() - t1, 2)))


def _pool_shapes(model, page_size: int, num_pages: int):
  table = attention.PageTable(jnp.zeros((1, 1), jnp.int32), page_size, num_pages)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens, tokens, table))['cache']


def _abstract_pool(shapes, num_pages: int, mesh, rules):
  def one(s):
    shape = (num_pages,) + s.shape[1:]
    return jax.ShapeDtypeStruct(shape, s.dtype, sharding=engine_lib.pool_sharding(mesh, rules, shape))
  return jax.tree.map(one, shapes)


def _abstract_batch(rows: int, tokens: int, pages_wide: int, mesh):
  """tokens, positions, valid, table, last, settings, counts (None), next_tokens: replicated, as the engine's."""
  def array(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))
  i32, f32 = jnp.int32, jnp.float32
  settings = RowSettings(array((rows,), f32), array((rows,), f32), array((rows,), i32), array((rows,), f32),
                         array((rows,), f32), array((rows,), f32), array((rows, 2), jnp.uint32),
                         array((rows,), i32))
  batch = array((rows, tokens), i32)
  return (batch, batch, array((rows, tokens), jnp.bool_), array((rows, pages_wide), i32), array((rows,), i32),
          settings, None, batch)


def format_report(r: dict[str, Any]) -> str:
  where = f'target {r["target"]}: ' if r['target'] else ''
  lines = [f'serving dry run: mesh {r["mesh"]} on {where}{r["num_devices"]} x {r["device_kind"]} ({r["platform"]}); '
           f'paged kernel {r["kernel"]}, pages of {r["page_size"]} tokens, context {r["max_model_len"]}, '
           f'compute {r["dtype"]}, weights {r["param_dtype"]}',
           f'per device: weights {r["params_gb_per_device"]:.3f} GiB, one page {r["page_bytes_per_device"] / 1024:.1f} '
           f'KiB (all layers), pool compiled with {r["num_pages_compiled"]} pages = {r["pool_gb_per_device"]:.3f} GiB']
  for name, s in r['steps'].items():
    m = {k: v / GIB for k, v in s['memory_per_device_bytes'].items()}
    lines.append(f'{name} step [{s["rows"]} x {s["tokens"]}], page table width {s["page_table_width"]}: peak '
                 f'{m["peak"]:.3f} GiB per device (arguments {m["arguments"]:.3f}, temporaries '
                 f'{m["temporaries"]:.3f}, donated {m["alias"]:.3f}); attention kernels '
                 f'{", ".join(s["attention_kernels"])}; compiled in {s["compile_seconds"]} s')
  if r['pages_fit'] is not None:
    lines.append(f'pages that fit {r["target"]}: {r["pages_fit"]:,} ({r["tokens_fit"]:,} tokens of K/V) in '
                 f'{r["usable_memory_gb"]:.1f} GiB usable per device, beside the weights and the larger step\'s '
                 'buffers' + ('' if r['fits'] else '; the compiled pool does NOT fit'))
  return '\n'.join(lines)
