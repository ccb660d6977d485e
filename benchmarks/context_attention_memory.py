"""Per-device memory of one context-parallel attention's gradient, compiled for a target from this machine: the
two exchanges (config.mesh.context_exchange) with the xla arithmetic, load-balanced layout, causal, bfloat16
q/k/v [1, T, heads, head_dim], the context axis over all of the target's devices. What benchmarks/RESULTS.md's
ring row is:

  PYTHONPATH=. python benchmarks/context_attention_memory.py --target=v5p-8 --seq=8192
  PYTHONPATH=. python benchmarks/context_attention_memory.py --target=h100x8 --seq=16384

`--target=cpu` runs it instead on this host's CPU split into --cpu_devices fake devices, and also times the
compiled gradient (best of 5, random inputs): a comparison of the exchanges on one machine, not a device's speed:

  PYTHONPATH=. python benchmarks/context_attention_memory.py --target=cpu --seq=4096 --heads=4 --kv_heads=2 \
    --head_dim=64 --dtype=float32

XLA's temporaries (`temp_size_in_bytes`) are what the attention adds to a step: the all_gather exchange's xla
kernel holds each device's [T/C, T] scores per head, the ring one piece of up to [1024, T/2C] at a time (its own
backward, masked pieces skipped, tiles of queries: llm_jax/model/context.py).
"""

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm_jax import config as config_lib
from llm_jax import platforms, targets
from llm_jax.model import attention, context
from llm_jax.model.partitioning import activation_sharding


def compiled_gradient(devices, exchange: str, length: int, heads: int, kv_heads: int, head_dim: int,
                      dtype=jnp.bfloat16):
  """(compiled d/d(q,k,v) sum(attention^2) over a sequence split across `devices`, its argument shapes)."""
  shape = [len(devices) if axis == 'context' else 1 for axis in config_lib.MESH_AXES]
  mesh = Mesh(np.asarray(devices).reshape(shape), config_lib.MESH_AXES)
  mask = functools.partial(attention.index_mask, causal=True, window=0)

  def loss(q, k, v, segments):
    with activation_sharding(mesh, config_lib.DEFAULT_RULES):
      out = context.sharded_attention(q, k, v, segments, segments, exchange=exchange, load_balance=True,
                                      mask=mask, local=attention.xla_context_local(mask))
    return jnp.sum(out.astype(jnp.float32) ** 2)

  split = NamedSharding(mesh, P(None, 'context'))
  args = [jax.ShapeDtypeStruct((1, length, n, head_dim), dtype, sharding=split) for n in (heads, kv_heads, kv_heads)]
  args.append(jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=split))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile(), args


def gradient_temporaries(devices, exchange: str, length: int, heads: int, kv_heads: int, head_dim: int,
                         dtype=jnp.bfloat16) -> int:
  """Bytes of XLA temporaries per device of that gradient (tests/test_context_parallel.py runs it on CPU devices)."""
  compiled, _ = compiled_gradient(devices, exchange, length, heads, kv_heads, head_dim, dtype)
  return compiled.memory_analysis().temp_size_in_bytes


def gradient_seconds(compiled, args, repeats: int = 5) -> float:
  """Best wall time of `repeats` runs of the compiled gradient on random inputs (devices that can run it)."""
  rng = np.random.default_rng(0)
  values = [jax.device_put(rng.normal(size=a.shape).astype(a.dtype), a.sharding) for a in args[:-1]]
  values.append(jax.device_put(np.ones(args[-1].shape, np.int32), args[-1].sharding))  # one document
  jax.block_until_ready(compiled(*values))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*values))
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--target', required=True, help=', '.join(['cpu'] + targets.names()))
  parser.add_argument('--cpu_devices', type=int, default=4, help='--target=cpu: fake CPU devices (the context axis)')
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  parser.add_argument('--seq', type=int, required=True, help='tokens of the one sequence')
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--kv_heads', type=int, default=2)
  parser.add_argument('--head_dim', type=int, default=128)
  args = parser.parse_args()
  on_cpu = args.target == 'cpu'
  if on_cpu:  # before jax starts its CPU backend
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.cpu_devices}')
  platforms.quiet_start()
  devices = jax.devices('cpu')[:args.cpu_devices] if on_cpu else targets.get(args.target).devices()
  print(f'{args.target}: context {len(devices)}, {args.seq:,} tokens, {args.heads} query and {args.kv_heads} kv '
        f'heads of {args.head_dim}, {args.dtype}')
  for exchange in context.EXCHANGES:
    compiled, shapes = compiled_gradient(devices, exchange, args.seq, args.heads, args.kv_heads, args.head_dim,
                                         jnp.dtype(args.dtype))
    line = f'  {exchange:<10} temporaries {compiled.memory_analysis().temp_size_in_bytes / 2**20:9.1f} MiB'
    if on_cpu:
      line += f', gradient {gradient_seconds(compiled, shapes):.3f} s (best of 5)'
    print(line, flush=True)


if __name__ == '__main__':
  main()
