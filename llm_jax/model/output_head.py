"""The output head: final hidden states -> logits, whole, or chunk by chunk into per-token values.

A loss needs a few numbers per token (log Z, the target's logit), not the [B,T,V] logits; but computed whole, the
logits and what the backward pass keeps of them (a float32 copy, the softmax) are the largest activations of a long
sequence with a large vocabulary: 32,768 tokens a device of Llama 3's 128,256 ids are 16 GiB per float32 copy.
`reduce_in_chunks` computes the head and a per-token reduction over `chunks` strided slices of the tokens, one at a
time, under a backward pass of its own that computes each chunk's logits again, so at most one chunk's logits exist
(MaxText's `num_vocab_tiling`, Levanter's blockwise cross-entropy). Strided slices (token t goes to chunk t % chunks) keep
each chunk split over the context axis like the sequence itself, so every device works on every chunk.

The head kernel lives where `nn.Dense(name='lm_head')` kept it (`lm_head/kernel` [D,V]); `head_logits` computes
what that Dense (or the tied embedding's `attend`) did, in the same dtypes.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm_jax.model.partitioning import active, axis_names, constrain

# fn(logits [B,C,V], extra sliced to [B,C,...]) -> pytree of per-token values [B,C,...]
Reducer = Callable[[jax.Array, Any], Any]
# fn(hidden [B,C,D], head weight, pin the logits' sharding) -> logits [B,C,V]
LogitsFn = Callable[[jax.Array, jax.Array, bool], jax.Array]


class HeadKernel(nn.Module):
  """The untied head's kernel [d_model, vocab] as a parameter at `<name>/kernel`, as nn.Dense stores it."""
  features: int
  init_std: float
  param_dtype: Any

  @nn.compact
  def __call__(self, in_features: int) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ('embed', 'vocab'))
    return self.param('kernel', init, (in_features, self.features), self.param_dtype)


def head_logits(x: jax.Array, weight: jax.Array, dtype, tied: bool) -> jax.Array:
  """x [..., D] -> logits [..., V] in `dtype`: x . kernel [D,V], or x . embedding[V,D]^T when tied (as flax's
  Dense and Embed.attend compute them: both operands cast to `dtype`)."""
  x, weight = x.astype(dtype), weight.astype(dtype)
  if tied:
    return jax.lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())))
  return jax.lax.dot_general(x, weight, (((x.ndim - 1,), (0,)), ((), ())))


def _to_chunks(a: jax.Array, chunks: int) -> jax.Array:
  """[B,T,...] -> [chunks, B, T/chunks, ...], chunk j holding tokens j, j + chunks, j + 2*chunks, ..."""
  b, t = a.shape[:2]
  a = a.reshape((b, t // chunks, chunks) + a.shape[2:])
  return jnp.moveaxis(a, 2, 0)


def _from_chunks(a: jax.Array) -> jax.Array:
  """The inverse of _to_chunks: [chunks, B, C, ...] -> [B, C * chunks, ...]."""
  chunks, b, c = a.shape[:3]
  return jnp.moveaxis(a, 0, 2).reshape((b, c * chunks) + a.shape[3:])


def reduce_in_chunks(x: jax.Array, weight: jax.Array, logits_of: LogitsFn, reducer: Reducer, extra: Any,
                     chunks: int, weight_names: tuple[str, str] = ('embed', 'vocab')) -> Any:
  """reducer over the logits of every token of x [B,T,D], `chunks` strided slices at a time (module docstring).

  `logits_of(h [B,C,D], weight, constrain)` gives the logits [B,C,V] (`constrain`: pin their sharding; False inside
  the manual region below); `extra` is a pytree of per-token arrays [B,T,...] sliced like x (targets, masks). With
  chunks = 1 this is reducer(logits_of(x, weight, True), extra), nothing rematerialised. A T that `chunks` does not
  divide is padded with zeros, and the padded tokens' values are dropped.

  On a mesh the chunk loop runs inside shard_map, manual over the axes that split the tokens (batch and sequence;
  the vocabulary's tensor axis stays automatic): the head's weight (logical axes `weight_names`) enters as the
  shard each device holds and is gathered (in the compute dtype), each device sums its own tokens' share of the
  weight's gradient over the chunks, and one reduce-scatter over the devices follows, before the layers' backward
  may start; the automatic partitioner would gather the weight and reduce its gradient in every chunk.
  """
  if chunks <= 1:
    return reducer(logits_of(x, weight, True), extra)
  t = x.shape[1]
  pad = -t % chunks
  if pad:
    widen = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    x, extra = widen(x), jax.tree.map(widen, extra)
  x_chunks = constrain(_to_chunks(x, chunks), (None, 'act_batch', 'act_seq', 'act_embed'))
  extra_chunks = jax.tree.map(lambda a: _to_chunks(a, chunks), extra)

  weight = weight.astype(x.dtype)  # what the head multiplies: gathered below in the compute dtype, not float32
  manual = _token_axes()
  if manual is None:
    out = _chunk_loop(logits_of, reducer, True, ())(x_chunks, weight, extra_chunks)
  else:
    mesh, rules, batch_axes, seq_axes, names = manual
    tokens = P(None, batch_axes, seq_axes)  # a prefix: the dims after [chunks, B, C] stay whole
    # The weight's shard over the manual axes (its automatic ones, the vocabulary's tensor axis, stay as they are).
    sharded = tuple((dim, tuple(a for a in axis_names(axes) if a in names))
                    for dim, axes in enumerate(nn.logical_to_mesh_axes(weight_names, rules)))
    sharded = tuple((dim, axes) for dim, axes in sharded if axes)
    weight_spec = P(*[dict(sharded).get(dim) for dim in range(weight.ndim)])
    out = jax.shard_map(_chunk_loop(logits_of, reducer, False, sharded), mesh=mesh,
                        in_specs=(tokens, weight_spec, tokens), out_specs=tokens, axis_names=names,
                        check_vma=False)(x_chunks, weight, extra_chunks)
  return jax.tree.map(lambda a: _from_chunks(a)[:, :t], out)


def _chunk_loop(logits_of: LogitsFn, reducer: Reducer, pin: bool, sharded: tuple[tuple[int, tuple[str, ...]], ...]):
  """f(x_chunks [n,B,C,D], weight shard, extra_chunks) -> per-token values [n,B,C,...], one chunk at a time, with its
  own backward pass: each chunk's logits are computed again from the saved hidden states, and the weight's gradient
  is summed over the chunks in float32 (rounded once to the weight's dtype at the end, as one matmul over all the
  tokens would be); nothing of a chunk outlives it. `sharded`: (dim, manual mesh axes) of the weight's shard, which
  is gathered, and its gradient reduce-scattered back to the shard (the shard_map around it sums over the other
  manual axes)."""

  def gather(shard):
    for dim, axes in sharded:
      shard = jax.lax.all_gather(shard, axes, axis=dim, tiled=True)
    return shard

  def scatter(grad):
    for dim, axes in reversed(sharded):
      grad = jax.lax.psum_scatter(grad, axes, scatter_dimension=dim, tiled=True)
    return grad

  def chunk_values(x_chunk, weight, extra_chunk):
    return reducer(logits_of(x_chunk, weight, pin), extra_chunk)

  @jax.custom_vjp
  def loop(x_chunks, shard, extra_chunks):
    weight = gather(shard)
    return jax.lax.map(lambda xs: chunk_values(xs[0], weight, xs[1]), (x_chunks, extra_chunks))

  def forward(x_chunks, shard, extra_chunks):
    return loop(x_chunks, shard, extra_chunks), (x_chunks, shard, extra_chunks)

  def backward(residuals, cotangents):
    x_chunks, shard, extra_chunks = residuals
    weight = gather(shard)

    def step(weight_grad, xs):
      x_chunk, extra_chunk, cotangent = xs
      _, vjp = jax.vjp(lambda h, w: chunk_values(h, w, extra_chunk), x_chunk, weight)
      x_grad, chunk_weight_grad = vjp(cotangent)
      return weight_grad + chunk_weight_grad.astype(jnp.float32), x_grad

    weight_grad, x_grads = jax.lax.scan(step, jnp.zeros(weight.shape, jnp.float32),
                                        (x_chunks, extra_chunks, cotangents))
    # The layers' backward waits for the weight's gradient to be reduced to its shard: XLA would otherwise
    # schedule the reduction at the end of the step and keep the float32 sum (2 GiB for Llama 3's head) alive
    # through the whole of the layers' backward, the step's peak.
    weight_grad, x_grads = jax.lax.optimization_barrier((scatter(weight_grad.astype(weight.dtype)), x_grads))
    return x_grads, weight_grad, None

  loop.defvjp(forward, backward)
  return loop


def _token_axes():
  """(mesh, rules, batch axes, sequence axes, their names as a set) of the active mesh's token-splitting axes, or
  None without a mesh or when they are all of size 1."""
  context = active()
  if context is None:
    return None
  mesh, rules = context
  batch_axes, seq_axes = nn.logical_to_mesh_axes(('act_batch', 'act_seq'), rules)
  names = set(axis_names(batch_axes) + axis_names(seq_axes))
  if all(mesh.shape[name] == 1 for name in names):
    return None
  return mesh, rules, batch_axes, seq_axes, frozenset(names)  # the specs name size-1 axes too: manual as well
