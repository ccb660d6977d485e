"""Logical axis names for activations, bound to a mesh only while a step is traced.

The model names its activations ('act_batch', 'act_seq', 'act_embed', ...) and calls `constrain`; outside an
`activation_sharding(mesh, rules)` context (a plain CPU forward, a unit test) that is a no-op. Parameters carry
their names through `nn.with_logical_partitioning`; both use the same rules table (config.mesh.rules).
`gather_for_matmul` pins a weight as a matmul reads it: whole over the axes that split the batch and sequence.

Why not flax's `nn.logical_axis_rules` + `nn.with_logical_constraint` (tried, issue 21): flax 0.12 applies the
constraint only under an abstract mesh (`jax.sharding.get_abstract_mesh()`). `jax.set_mesh` is refused inside
`jax.jit`, where this context is entered (the step is being traced), and under `use_abstract_mesh` a Pallas
kernel's shard_map gets only the abstract mesh: splash then failed to run on fake CPU devices ("No registered
implementation for untyped custom call to xla.sdy.GlobalToLocalShape for Host", tests/test_splash.py). The
concrete mesh this context holds is what shard_map needs; `nn.logical_to_mesh_axes` does the rules' work.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar('llm_jax_activation_sharding', default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple]):
  """Within this context, `constrain` pins activations to `mesh` according to `rules`."""
  token = _ACTIVE.set((mesh, tuple(tuple(rule) for rule in rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, tuple] | None:
  """(mesh, rules) of the enclosing `activation_sharding` context, or None: what a kernel that must run inside
  shard_map (a Pallas kernel) shards itself over."""
  return _ACTIVE.get()


def axis_names(axes) -> tuple[str, ...]:
  """The mesh axis names of a rule's value (what `nn.logical_to_mesh_axes` gives one logical name): one name, a
  tuple of them, or None (none)."""
  if axes is None:
    return ()
  return axes if isinstance(axes, tuple) else (axes,)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; identity when no mesh is active."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gather_for_matmul(w: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`w` (a weight with logical names `names`) constrained to be whole over the mesh axes that split the batch and
  the sequence (the rules of 'act_batch' and 'act_seq': data, fsdp, context, ...), still split over the others
  (tensor): the layout each device's matmul reads. Identity when no mesh is active.

  Why: under FSDP the partitioner gathers a weight once per dot that reads it and leaves merging the copies to a
  CSE pass. With remat, a projection's recompute and the backward's transpose read the same weight; TPU merges
  their two gathers only within a distance limit (libtpu's xla_tpu_spmd_threshold_for_allgather_cse: raised to
  10000, the 7b preset's extra gathers go too), which q and k, with RoPE in float32 between projection and
  attention, exceeded: the 7b backward on a v5p-8 gathered them twice (1.5 GiB more sent a step). One constrained
  value read by both dots is gathered once, on any backend and without a flag (tests/test_aot.py).
  """
  active = _ACTIVE.get()
  if active is None:
    return w
  mesh, rules = active
  split_data = set()
  for name in ('act_batch', 'act_seq'):
    split_data.update(axis_names(nn.logical_to_mesh_axes((name,), rules)[0]))

  def kept(axes):
    left = tuple(axis for axis in axis_names(axes) if axis not in split_data)
    return left if len(left) > 1 else (left[0] if left else None)

  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, PartitionSpec(*(kept(axes) for axes in spec))))
