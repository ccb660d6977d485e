"""Device mesh, logical-axis rules and sharded initialisation.

The mesh has axes ('data', 'fsdp', 'tensor') sized by config.mesh. Every parameter carries logical axis names
(from nn.with_logical_partitioning); config.mesh.rules maps them to mesh axes. State is created shape-first:
`jax.eval_shape` gives the boxed abstract tree, the rules give a NamedSharding per leaf, and the initialiser runs
under jit with those out_shardings, so the full state never lands on one device.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax import config as config_lib

BATCH_AXES = ('data', 'fsdp')  # the global batch is split over these mesh axes


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.resolve_mesh_shape(config.mesh, len(devices))
  sizes = [shape[axis] for axis in config_lib.MESH_AXES]
  if len(devices) == len(jax.devices()):
    try:  # topology-aware order (ICI/NVLink neighbours share the inner axes)
      from jax.experimental import mesh_utils
      grid = mesh_utils.create_device_mesh(sizes, devices=devices)
      return Mesh(grid, config_lib.MESH_AXES)
    except (ValueError, NotImplementedError, AssertionError):
      pass
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), config_lib.MESH_AXES)


def rules_of(config) -> tuple[tuple[str, Any], ...]:
  return tuple((rule[0], tuple(rule[1]) if isinstance(rule[1], list) else rule[1]) for rule in config.mesh.rules)


def logical_shardings(boxed_abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedSharding for each leaf of a tree of nn.LogicallyPartitioned boxes (unboxed leaves: replicated)."""
  logical_specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, seq] arrays: batch split over data and fsdp, sequence whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` (which returns a boxed tree) under jit with out_shardings from the logical rules.

  Returns (unboxed tree placed on the mesh, its shardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  unboxed_init = lambda *a: nn.unbox(init_fn(*a))
  tree = jax.jit(unboxed_init, out_shardings=shardings)(*args)
  return tree, shardings


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's slice of the batch (works for one and many processes)."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
