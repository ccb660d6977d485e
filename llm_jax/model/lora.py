"""LoRA on parameter trees: which leaves train, splitting adapters from the base, merging them into it.

`Projection` (layers.py) adds `lora_a` [in..., r] and `lora_b` [r, out...] next to its `kernel` [in..., out...]
when config.lora.rank > 0, and computes y = x.W + (x.A).B * alpha/r with B initialised to zero, so a fresh
adapter leaves the model unchanged. Training with adapters trains only the adapters: `trainable_mask` labels
them, the optimizer gives the other parameters no state (optim.make_optimizer(trainable_mask=...)) and the train
step keeps them bit-identical. Scanned layers carry a leading [layers] axis on all three arrays; `merge` handles
any number of such leading axes.

  trainable_mask(params)          True on lora_a / lora_b leaves
  split(params)                   (base tree without adapters, adapters-only tree)
  combine(base, adapters)         the full tree again
  merge(params, alpha, rank)      base tree with W + A@B * alpha/rank: the same function as base + adapters,
                                  for export and generation by a model built with lora.rank = 0

Saving and loading adapters only (orbax I/O) lives job-side, in llm_jax/lora_io.py. Like all of model/, this
module imports only jax and numpy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_NAMES = ('lora_a', 'lora_b')


def _is_adapter_path(path) -> bool:
  return any(getattr(entry, 'key', None) in ADAPTER_NAMES for entry in path)


def trainable_mask(params) -> Any:
  """Same tree as `params` (boxed or not), True on adapter leaves, False on the frozen base weights."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_adapter_path(path), params)


def has_adapters(params) -> bool:
  return any(jax.tree.leaves(trainable_mask(params)))


def split(params: dict) -> tuple[dict, dict]:
  """(base, adapters): nested dicts; modules without adapters do not appear in `adapters`."""
  base, adapters = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      b, a = split(value)
      if b:
        base[key] = b
      if a:
        adapters[key] = a
    elif key in ADAPTER_NAMES:
      adapters[key] = value
    else:
      base[key] = value
  return base, adapters


def combine(base: dict, adapters: dict) -> dict:
  """Inverse of `split`."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = combine(out.get(key, {}), value) if isinstance(value, dict) else value
  return out


def merged_kernel(kernel, lora_a, lora_b, scale: float):
  """W + A@B * scale for W [lead..., in..., out...], A [lead..., in..., r], B [lead..., r, out...]."""
  lead = lora_a.ndim + lora_b.ndim - 2 - kernel.ndim
  in_shape = lora_a.shape[lead:-1]
  out_shape = lora_b.shape[lead + 1:]
  lead_shape = kernel.shape[:lead]
  a = lora_a.astype(jnp.float32).reshape(*lead_shape, int(np.prod(in_shape)), lora_a.shape[-1])
  b = lora_b.astype(jnp.float32).reshape(*lead_shape, lora_b.shape[lead], int(np.prod(out_shape)))
  delta = jnp.matmul(a, b).reshape(kernel.shape) * scale
  return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merge(params: dict, alpha: float, rank: int) -> dict:
  """The base tree (no adapters) with every adapted kernel replaced by W + A@B * alpha/rank."""
  out = {}
  for key, value in params.items():
    if key in ADAPTER_NAMES:
      continue
    if isinstance(value, dict):
      if 'lora_a' in value and 'kernel' in value:
        merged = {k: v for k, v in value.items() if k not in ADAPTER_NAMES}
        merged['kernel'] = merged_kernel(value['kernel'], value['lora_a'], value['lora_b'], alpha / rank)
        out[key] = merged
      else:
        out[key] = merge(value, alpha, rank)
    else:
      out[key] = value
  return out
