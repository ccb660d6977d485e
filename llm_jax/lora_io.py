"""Adapters-only save and load for LoRA runs (orbax I/O, kept out of model/, which imports only jax/flax/numpy).

  save_adapters(params_or_adapters, dir, lora_config)   the lora_a/lora_b leaves only, plus lora.json with
                                                        rank/alpha/targets
  load_adapters(dir, like)                              restored onto the shapes (and shardings) of `like`
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp

from llm_jax import storage
from llm_jax.model import lora

ADAPTER_META = 'lora.json'


def save_adapters(params_or_adapters: dict, directory: str, lora_config=None) -> str:
  """Writes only the adapters of a parameter tree (or an adapters tree) to `directory` (orbax), with
  lora.json recording rank/alpha/targets when `lora_config` (config.lora) is given. Returns the directory."""
  _, adapters = lora.split(params_or_adapters)
  if not adapters:
    raise ValueError('save_adapters: the parameters have no lora_a/lora_b leaves (is config.lora.rank 0?)')
  directory = storage.absolute(directory)
  storage.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(storage.join(directory, 'adapters'), adapters, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if lora_config is not None and jax.process_index() == 0:
    meta = dict(rank=int(lora_config.rank), alpha=float(lora_config.alpha), targets=str(lora_config.targets))
    storage.write_text(storage.join(directory, ADAPTER_META), json.dumps(meta, indent=2))
  return directory


def load_adapters(directory: str, like: dict) -> dict:
  """The adapters saved by `save_adapters`, restored onto the shapes (and shardings) of `like`'s adapters."""
  path = storage.join(storage.absolute(directory), 'adapters')
  if not storage.isdir(path):
    raise FileNotFoundError(f'{path}: no saved adapters (written by llm_jax.lora_io.save_adapters)')
  _, adapters_like = lora.split(like)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
                          adapters_like)
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(path, abstract)
  finally:
    checkpointer.close()
