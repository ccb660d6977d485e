"""Context parallelism: attention over a sequence split across the context mesh axis (config.mesh.context).

Every activation [B,T,...] is split along T by the rules table (act_seq -> context); RMSNorm, the FFN and the
projections work per token and stay local. Attention is the one place a token needs the others' keys and
values: `sharded_attention` runs inside shard_map over the mesh, each device holding its T/C queries, keys and
values (C = context shards), and exchanges K/V one of two ways (config.mesh.context_exchange, `EXCHANGES`):

  all_gather  K/V and their segment ids all-gathered over the axis, then one call of the local kernel (xla or
              splash) over the whole key sequence. Per layer and device it holds 2*T*K*H of K/V (K kv heads: small
              under grouped-query attention) and receives (C-1)/C of it in one collective before the kernel; the
              backward pass reduce-scatters dK/dV.
  ring        C steps: at step s a device attends to the K/V block of device (c - s) mod C, while the block of
              step s+1 is already in flight (its ppermute is issued before this block's compute, so the transfer
              can overlap it). An online softmax (running max, sum and output, float32) accumulates the blocks.
              The same bytes as all_gather in C-1 neighbour-to-neighbour steps, holding one K/V block at a time.
              Its own backward pass (`_ring_vjp`, the blockwise form of flash attention): the forward keeps only
              its output and each query's log-sum-exp; the backward passes K/V round again, each block's dK/dV
              (float32) travelling beside it and arriving home after C steps, and recomputes each block's
              probabilities, so neither pass holds more than one block's [T/C, T/C] scores per head (autodiff
              of the loop kept every step's: the whole [T/C, T] the xla kernel holds). Each step works on
              pairs of (half the queries, half the key block) and skips, by lax.cond, a pair whose queries see
              none of its keys: under a causal mask about half of them, with or without load balancing (in
              the load-balanced layout the halves are the early and the late chunk), and computes a pair's scores
              for tiles of up to RING_QUERY_TILE queries at a time. xla arithmetic only.

Load balancing (config.mesh.context_load_balance). Under a causal mask the device holding the last chunk has
the most work. With `token_order` the sequence is cut into 2C chunks and device c holds chunks c and 2C-1-c, one
early and one late, so every device has the same causal work wherever the kernel skips masked blocks (splash).
The model permutes tokens, segment ids and positions at its input, so positions and document ids travel with
their tokens. What leaves the model returns to input order, so no objective knows the layout (they read by index:
logits_at, completion spans, per-sequence sums): a loss's per-token values (`Transformer`'s `reduce`, [B,T]
numbers: the targets go into the layout, the values come out), or, when logits are asked for, the hidden states
before the final norm (one [B,T,D] exchange). Both permutations are static slices of contiguous runs (`_permute`).

The mask never reads positions (they restart in every packed document): each device takes the original
sequence index of its queries and of every key from the static order, and the kernel masks by segment id,
causality and window over those indices, exactly the one-device mask.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from llm_jax.model.partitioning import active, axis_names

EXCHANGES = ('all_gather', 'ring')  # config.mesh.context_exchange
_NEG = -0.7 * float(np.finfo(np.float32).max)  # masked logit: finite, so exp(masked - running max) never NaNs


def axes_size(mesh, axes) -> int:
  """Devices along one mesh axis name, a tuple of them, or None (1)."""
  return math.prod(mesh.shape[a] for a in axis_names(axes))


def axis_index(axes):
  """This device's index along one mesh axis or several (major to minor), inside shard_map."""
  index = 0
  for name in axis_names(axes):
    index = index * jax.lax.axis_size(name) + jax.lax.axis_index(name)
  return index


def sequence_axes(rules):
  """The mesh axes the sequence of activations is split over (rule 'act_seq'): a name, a tuple, or None."""
  return nn.logical_to_mesh_axes(('act_seq',), rules)[0]


def active_shards() -> int:
  """Context shards of the enclosing activation_sharding context (1 outside one: a plain forward)."""
  context = active()
  if context is None:
    return 1
  mesh, rules = context
  return axes_size(mesh, sequence_axes(rules))


def token_order(length: int, shards: int, load_balance: bool) -> np.ndarray | None:
  """order[j] = the input index of the token at slot j of the layout the devices hold (device c: slots
  [c*T/C, (c+1)*T/C)); None for the input order itself (one shard, or no load balancing)."""
  if shards <= 1 or not load_balance:
    return None
  chunk = length // (2 * shards)
  chunks = [(c, 2 * shards - 1 - c) for c in range(shards)]
  return np.concatenate([np.arange(i * chunk, (i + 1) * chunk) for pair in chunks for i in pair]).astype(np.int32)


def query_runs(length: int, shards: int, load_balance: bool) -> list[list[tuple[int, int]]]:
  """Per device, its queries as contiguous runs of the input order, in the order it holds them:
  [(start, size), ...] (one run; two, an early and a late chunk, under load balancing). What a kernel whose
  masks take a static offset (splash) needs: one mask per run."""
  if load_balance and shards > 1:
    chunk = length // (2 * shards)
    return [[(c * chunk, chunk), ((2 * shards - 1 - c) * chunk, chunk)] for c in range(shards)]
  block = length // shards
  return [[(c * block, block)] for c in range(shards)]


def _permute(x: jax.Array, order: np.ndarray) -> jax.Array:
  """x[:, order] as static slices of its contiguous runs, concatenated: a gather written as slices, whose
  transpose is pads and adds, not a scatter (under context parallelism XLA turned the K/V gradients' scatter into
  an all-reduce of the whole sequence where it could have reduce-scattered them)."""
  breaks = np.flatnonzero(np.diff(order) != 1) + 1
  starts = np.concatenate([[0], breaks])
  ends = np.concatenate([breaks, [len(order)]])
  pieces = [jax.lax.slice_in_dim(x, int(order[a]), int(order[a]) + int(b - a), axis=1) for a, b in zip(starts, ends)]
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def to_layout(x: jax.Array, order: np.ndarray | None) -> jax.Array:
  """x [B,T,...] in input order -> the devices' layout (axis 1 permuted by `order`)."""
  return x if order is None else _permute(x, order)


def from_layout(x: jax.Array, order: np.ndarray | None) -> jax.Array:
  """The inverse of to_layout."""
  return x if order is None else _permute(x, np.argsort(order))


# local(q [b,t,N,H], k, v [b,S,K,H], q_segment_ids [b,t], kv_segment_ids [b,S], q_index [t], k_index [S], shard)
# -> out: attention of a device's queries over all keys (in the layout's order), with the input-order index of
# every query and key, and the device's index along the context axes (`query_runs` gives its static runs).
LocalKernel = Callable[..., jax.Array]
# mask(q_segment_ids [b,t], kv_segment_ids [b,S], q_index [t], k_index [S]) -> [b,t,S] bool.
MaskFn = Callable[..., jax.Array]


def sharded_attention(q, k, v, q_segment_ids, kv_segment_ids, *, exchange: str, load_balance: bool,
                      mask: MaskFn, local: LocalKernel | None, softcap: float = 0.0):
  """Attention of q [B,T,N,H] over k/v [B,T,K,H], all in the devices' layout (`token_order`) and split over the
  context axis, inside shard_map over the active mesh (batch and heads split as the rules say). `local` is the
  all_gather exchange's kernel; the ring computes its blocks itself under `mask`, soft-capping its logits at
  `softcap` (0 = none; the local kernel applies its own)."""
  mesh, rules = active()
  axes = sequence_axes(rules)
  shards = axes_size(mesh, axes)
  batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(('act_batch', 'act_seq', 'act_heads', None), rules)
  _, _, kv_axes, _ = nn.logical_to_mesh_axes(('act_batch', 'act_seq', 'act_kv_heads', None), rules)
  n, kv_heads, length = q.shape[2], k.shape[2], q.shape[1]
  head_shards = axes_size(mesh, head_axes)
  if kv_axes != head_axes or n % head_shards or kv_heads % head_shards:
    raise ValueError(f'context parallelism: {n} query and {kv_heads} kv heads do not split alike over '
                     f'{head_shards} devices ({head_axes}, {kv_axes})')
  if length % shards:
    raise ValueError(f'context parallelism: a sequence of {length} tokens does not split over {shards} devices')
  order = token_order(length, shards, load_balance)
  index = np.arange(length, dtype=np.int32) if order is None else order
  block = length // shards

  def body(q, k, v, q_segment_ids, kv_segment_ids):
    me = axis_index(axes)
    all_index = jnp.asarray(index)
    q_index = jax.lax.dynamic_slice_in_dim(all_index, me * block, block)
    if exchange == 'all_gather':
      k, v, kv_segment_ids = (jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (k, v, kv_segment_ids))
      return local(q, k, v, q_segment_ids, kv_segment_ids, q_index, all_index, me)
    if exchange == 'ring':
      return _ring(q, k, v, q_segment_ids, kv_segment_ids, q_index, all_index, me, axes, shards, mask, softcap)
    raise ValueError(f'unknown context exchange {exchange!r}; expected one of {", ".join(EXCHANGES)}')

  q_spec, kv_spec = P(batch_axes, axes, head_axes, None), P(batch_axes, axes, kv_axes, None)
  seg_spec = P(batch_axes, axes)
  sharded = jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                          out_specs=q_spec, check_vma=False)
  return sharded(q, k, v, q_segment_ids, kv_segment_ids)


def _ring(q, k, v, q_segment_ids, kv_segment_ids, q_index, all_index, me, axes, shards, mask, softcap=0.0):
  """The ring exchange on one device (module docstring): online softmax over the C key blocks, under its own
  backward pass (`_ring_vjp`)."""
  attend = jax.custom_vjp(functools.partial(_ring_forward, axes=axes, shards=shards, mask=mask, softcap=softcap,
                                            residuals=False))
  attend.defvjp(functools.partial(_ring_forward, axes=axes, shards=shards, mask=mask, softcap=softcap,
                                  residuals=True),
                functools.partial(_ring_vjp, axes=axes, shards=shards, mask=mask, softcap=softcap))
  # A remat block of its own, keeping only the output and log-sum-exp: inside the layers' scan under remat, partial
  # evaluation otherwise split the forward's own loops and kept every ring step's scores and masks for the backward
  # pass (the long preset on 8 H100s, 64k tokens: XLA's peak 91.8 GiB -> 31.9). Without remat the scan still keeps
  # them (about half the all_gather exchange's temporaries).
  keep = jax.checkpoint_policies.save_only_these_names('ring_out', 'ring_log_sum')
  return jax.checkpoint(attend, policy=keep)(q, k, v, q_segment_ids, kv_segment_ids, q_index, all_index, me)


def _block_logits(qg, k_block, visible, softcap):
  """One key block's scores [b,K,G,t,S] in float32 (scaled, soft-capped, masked to _NEG) and the soft-cap's
  tanh (None without a cap), which the backward pass needs for the cap's derivative."""
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', qg, k_block, preferred_element_type=jnp.float32) * (qg.shape[-1] ** -0.5)
  capped = None
  if softcap:  # Gemma 2's attention-logit soft-cap, as attention.soft_cap
    capped = jnp.tanh(logits / softcap)
    logits = softcap * capped
  return jnp.where(visible, logits, _NEG), capped


def _pass_right(blocks, axes, shards):
  """Each device's blocks sent to the next device along the ring (the last to the first)."""
  return tuple(jax.lax.ppermute(x, axes, [(j, (j + 1) % shards) for j in range(shards)]) for x in blocks)


def _ring_steps(step_fn, carry, held, axes, shards):
  """Runs step_fn(carry, held K/V blocks, step) -> carry for the C ring steps: the first C-1 in a scan whose body
  issues the next block's transfer before its compute (so it can overlap; and a loop, not C unrolled copies, so
  the compiler reuses one step's temporaries), the last without a transfer."""
  def body(state, step):
    carry, held = state
    incoming = _pass_right(held, axes, shards)
    return (step_fn(carry, held, step), incoming), None

  (carry, held), _ = jax.lax.scan(body, (carry, held), jnp.arange(shards - 1))
  return step_fn(carry, held, shards - 1)


RING_QUERY_TILE = 1024  # queries whose scores against a ring step's key piece are computed at once


def _split_tiles(x: jax.Array, axis: int, tile: int) -> jax.Array:
  """x with its `axis` cut into tiles of `tile`, the tiles along a new leading axis."""
  x = x.reshape(x.shape[:axis] + (x.shape[axis] // tile, tile) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _join_tiles(x: jax.Array, axis: int) -> jax.Array:
  """The inverse of _split_tiles."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _over_query_tiles(fn, carry, args, out_axes):
  """fn(carry, *tiles) -> (carry, outputs) over tiles of up to RING_QUERY_TILE queries, in a scan, so a step holds
  one tile's [tile, S] scores per head however long the sequence (a flash kernel's tiling, in xla arithmetic).
  `args` are (array, its query axis) pairs; the outputs are joined back along `out_axes`."""
  length = args[0][0].shape[args[0][1]]
  tile = max(d for d in range(1, min(length, RING_QUERY_TILE) + 1) if length % d == 0)
  if tile == length:
    return fn(carry, *(x for x, _ in args))
  carry, outs = jax.lax.scan(lambda c, xs: fn(c, *xs), carry, tuple(_split_tiles(x, a, tile) for x, a in args))
  return carry, tuple(_join_tiles(y, a) for y, a in zip(outs, out_axes))


def _halves(length: int) -> list[slice]:
  """The two halves of a device's block (under load balancing: its early and its late chunk), or the block whole
  when its length is odd: the pieces the ring skips when no query of one sees any key of another."""
  return [slice(0, length // 2), slice(length // 2, length)] if length % 2 == 0 else [slice(0, length)]


def _visible_pairs(mask, q_segment_ids, q_index, k_segments, all_index, me, step, shards):
  """For each pair of (half of this device's queries, half of the key block held at ring step `step`):
  (query half's number, its slice, key half's number, its slice, visible [b,1,1,t/2,S/2])."""
  block = k_segments.shape[1]
  source = jax.lax.dynamic_slice_in_dim(all_index, ((me - step) % shards) * block, block)  # the keys' indices
  for i, qs in enumerate(_halves(q_index.shape[0])):
    for j, ks in enumerate(_halves(block)):
      yield i, qs, j, ks, mask(q_segment_ids[:, qs], k_segments[:, ks], q_index[qs], source[ks])[:, None, None]


def _ring_forward(q, k, v, q_segment_ids, kv_segment_ids, q_index, all_index, me, *, axes, shards, mask, softcap,
                  residuals):
  """Forward pass: the output, and with `residuals` what the backward pass keeps: the inputs, the output and
  each query's log-sum-exp of its scores (float32), never a block's scores. Each step works on the four pairs of
  (half of the queries, half of the key block), and skips a pair no query of which sees any of its keys (under a
  causal mask about half of all pairs; lax.cond, so the compute is skipped on devices, not masked)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)

  def update(state, qg, k_block, v_block, visible):
    def tile(_, qg, peak, total, out, visible):
      logits, _ = _block_logits(qg, k_block, visible, softcap)
      new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
      probs = jnp.where(visible, jnp.exp(logits - new_peak[..., None]), 0.0)
      rescale = jnp.exp(peak - new_peak)
      total = total * rescale + jnp.sum(probs, axis=-1)
      out = out * rescale[..., None] + jnp.einsum('BKGTS,BSKH->BKGTH', probs.astype(v_block.dtype), v_block,
                                                  preferred_element_type=jnp.float32)
      return (), (new_peak, total, out)

    peak, total, out = state
    _, state = _over_query_tiles(tile, (), [(qg, 1), (peak, 3), (total, 3), (out, 3), (visible, 3)], (3, 3, 3))
    return state

  def step_fn(states, held, step):
    k_block, v_block, k_segments = held
    states = list(states)
    for i, qs, _, ks, visible in _visible_pairs(mask, q_segment_ids, q_index, k_segments, all_index, me, step,
                                                shards):
      states[i] = jax.lax.cond(jnp.any(visible), functools.partial(update, visible=visible), lambda state, *_: state,
                               states[i], qg[:, qs], k_block[:, ks], v_block[:, ks])
    return tuple(states)

  def start(qs):
    shape = (b, kv_heads, n // kv_heads, qs.stop - qs.start)
    return jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (h,), jnp.float32)

  states = _ring_steps(step_fn, tuple(start(qs) for qs in _halves(t)), (k, v, kv_segment_ids), axes, shards)
  # every query sees at least itself (same segment, index distance 0), so total > 0
  out = jnp.concatenate([out / total[..., None] for _, total, out in states], axis=3)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
  if not residuals:
    return out
  log_sum = jnp.concatenate([peak + jnp.log(total) for peak, total, _ in states], axis=3)  # [b,K,G,t]
  out, log_sum = checkpoint_name(out, 'ring_out'), checkpoint_name(log_sum, 'ring_log_sum')
  return out, (q, k, v, q_segment_ids, kv_segment_ids, q_index, all_index, me, out, log_sum)


def _ring_vjp(saved, d_out, *, axes, shards, mask, softcap):
  """Backward pass of the ring, the blockwise (flash) form: K/V go round the ring again with their gradients
  travelling beside them (float32; passed on after every step, C times, so each block's dK/dV arrives back at
  its owner); each block's probabilities are recomputed from the saved log-sum-exp, so no pass holds more than
  one block's scores. The same pairs as the forward pass are skipped."""
  q, k, v, q_segment_ids, kv_segment_ids, q_index, all_index, me, out, log_sum = saved
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  d_outg = d_out.reshape(qg.shape)
  # d(softmax) = p * (dp - sum_s p dp), and sum_s p dp = sum_h dO * O per query
  delta = jnp.einsum('BTKGH,BTKGH->BKGT', d_outg.astype(jnp.float32), out.reshape(qg.shape).astype(jnp.float32))
  scale = h ** -0.5

  def grads(carry, qg, d_outg, delta, log_sum, k_block, v_block, visible):
    def tile(kv_grads, qg, d_outg, delta, log_sum, visible, dq):
      dk_block, dv_block = kv_grads
      logits, capped = _block_logits(qg, k_block, visible, softcap)
      probs = jnp.where(visible, jnp.exp(logits - log_sum[..., None]), 0.0)  # [b,K,G,tile,S]
      dv_block = dv_block + jnp.einsum('BKGTS,BTKGH->BSKH', probs.astype(d_outg.dtype), d_outg,
                                       preferred_element_type=jnp.float32)
      d_probs = jnp.einsum('BTKGH,BSKH->BKGTS', d_outg, v_block, preferred_element_type=jnp.float32)
      d_logits = probs * (d_probs - delta[..., None])
      if capped is not None:
        d_logits = d_logits * (1.0 - capped * capped)
      d_logits = (d_logits * scale).astype(qg.dtype)
      dq = dq + jnp.einsum('BKGTS,BSKH->BTKGH', d_logits, k_block, preferred_element_type=jnp.float32)
      dk_block = dk_block + jnp.einsum('BKGTS,BTKGH->BSKH', d_logits, qg, preferred_element_type=jnp.float32)
      return (dk_block, dv_block), (dq,)

    dq, dk_block, dv_block = carry
    (dk_block, dv_block), (dq,) = _over_query_tiles(
        tile, (dk_block, dv_block), [(qg, 1), (d_outg, 1), (delta, 3), (log_sum, 3), (visible, 3), (dq, 1)], (1,))
    return dq, dk_block, dv_block

  def step_fn(carry, held, step):
    dq, dk, dv = (list(x) for x in carry)  # per half of the queries; per half of the key block
    k_block, v_block, k_segments = held
    for i, qs, j, ks, visible in _visible_pairs(mask, q_segment_ids, q_index, k_segments, all_index, me, step,
                                                shards):
      dq[i], dk[j], dv[j] = jax.lax.cond(
          jnp.any(visible), functools.partial(grads, visible=visible), lambda carry, *_: carry,
          (dq[i], dk[j], dv[j]), qg[:, qs], d_outg[:, qs], delta[..., qs], log_sum[..., qs], k_block[:, ks],
          v_block[:, ks])
    # the gradients follow their block; after the last step this pass takes them home to its owner
    passed = _pass_right(dk + dv, axes, shards)
    return tuple(dq), passed[:len(dk)], passed[len(dk):]

  def zero_halves(x):  # float32 zeros for each half of x's token axis (1)
    return tuple(jnp.zeros(x[:, s].shape, jnp.float32) for s in _halves(x.shape[1]))

  start = (zero_halves(qg), zero_halves(k), zero_halves(v))
  dq, dk, dv = _ring_steps(step_fn, start, (k, v, kv_segment_ids), axes, shards)
  dq, dk, dv = (jnp.concatenate(x, axis=1) for x in (dq, dk, dv))
  return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None,
          None)
