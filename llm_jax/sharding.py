"""Device mesh, logical-axis rules, batch placement and the multi-process start.

The mesh has axes config.MESH_AXES = ('data', 'expert', 'fsdp', 'context', 'tensor') sized by config.mesh. Every parameter
carries logical axis names (from nn.with_logical_partitioning); config.mesh.rules maps them to mesh axes. State is created shape-first:
`jax.eval_shape` gives the boxed abstract tree, `logical_shardings` a NamedSharding per leaf, and the Trainer
runs the initialiser under jit with those out_shardings, so the full state never lands on one device.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax import config as config_lib

BATCH_AXES = ('data', 'expert', 'fsdp')  # the global batch is split over these mesh axes (= rule act_batch)


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A config.MESH_AXES mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.resolve_mesh_shape(config.mesh, len(devices))
  sizes = [shape[axis] for axis in config_lib.MESH_AXES]
  if len(devices) == len(jax.devices()) or devices[0].platform != jax.devices()[0].platform:
    try:  # topology-aware order (ICI/NVLink neighbours share the inner axes); also for an AOT target's devices
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


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, slice_count: int = 1) -> dict[str, jax.Array]:
  """Global arrays from this process's slice of the batch (one of `slice_count`; see process_batch_slice)."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * slice_count,) + v.shape[1:])
          for k, v in batch.items()}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> None:
  """Starts JAX's multi-process runtime. With explicit arguments: a cluster of our own (localhost tests,
  bare GPU nodes); with `auto`: jax.distributed.initialize() detects TPU pods and SLURM by itself."""
  explicit = coordinator_address or num_processes or process_id is not None
  if not explicit and not auto:
    return
  if explicit:
    if not (coordinator_address and num_processes and process_id is not None):
      raise config_lib.ConfigError('--coordinator_address, --num_processes and --process_id must be given together')
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()


def process_batch_slice(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
  """(slice index, slice count) of the global batch rows this process's devices hold.

  The data pipeline cuts each global batch into `count` equal slices; this process must feed slice `index`.
  Derived from the batch sharding itself, so it stays right for any device order in the mesh.
  """
  if jax.process_count() == 1:
    return 0, 1
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size, 1))
  rows = sorted({(idx[0].start or 0, idx[0].stop or global_batch_size) for idx in indices.values()})
  start, stop = rows[0][0], rows[-1][1]
  covered = sum(b - a for a, b in rows)
  if covered != stop - start or global_batch_size % (stop - start) or start % (stop - start):
    raise ValueError(f'process {jax.process_index()} holds batch rows {rows}, not one aligned block; put the '
                     f'tensor axis inside a host (config.mesh.tensor <= devices per process)')
  return start // (stop - start), global_batch_size // (stop - start)
