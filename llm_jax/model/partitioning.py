"""Logical axis names for activations, bound to a mesh only while a step is traced.

The model names its activations ('act_batch', 'act_seq', 'act_embed', ...) and calls `constrain`; outside an
`activation_sharding(mesh, rules)` context (a plain CPU forward, a unit test) that is a no-op. Parameters carry
their names through `nn.with_logical_partitioning`; both use the same rules table (config.mesh.rules).

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
from jax.sharding import Mesh, NamedSharding

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
