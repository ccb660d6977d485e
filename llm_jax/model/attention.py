"""Grouped-query self-attention and the one place that picks the attention kernel.

Kernels share one signature, `kernel(q, k, v, mask_info, softcap=0.0) -> out`, with q [B,T,N,H], k/v [B,S,K,H]
and out [B,T,N,H]; `softcap` > 0 soft-caps the scaled logits, softcap * tanh(logits / softcap) (Gemma 2), and a
kernel that cannot (cuDNN) refuses it. `mask_info` carries segment ids, whether attention is causal and the sliding window; each kernel builds
the mask its own way, and none may ignore the segment ids (tokens never attend across packed documents) or the
window (a query sees itself and the window-1 keys before it: Mistral's `sliding_window`, as transformers masks it).
Packed documents are contiguous, so a window over key indices is the same window over positions in a document.

  xla     einsum + softmax; runs everywhere and is the reference.
  cudnn   cuDNN flash attention on NVIDIA GPUs (bf16/fp16, head_dim % 8 == 0), without a dense mask where it can
          (see "cuDNN and packed documents" below); the dense segment mask is the fallback.
  splash  the Pallas splash-attention kernel on TPU, with segment ids, inside shard_map over the mesh; on CPU
          the same kernel runs in Pallas interpret mode (slow: for tests).
  auto    cudnn on GPU and splash on TPU where the shapes allow, xla otherwise, decided from the platform of
          the mesh's devices (not the host's default backend), so an ahead-of-time compile for a target
          takes the kernels training on it takes.

cuDNN and packed documents. A dense [B,1,T,S] mask turns into a bias: cuDNN then reads a bias tile for every
score tile (and some jax releases materialise its gradient). Instead the row's segment ids become cuDNN's packed
layout (`pack_segments`): per row, the runs of equal segment ids in order, as lengths [B,M] and start offsets
[B,M+1] with -1 in unused slots, M = `MaskInfo.max_segments` (config.model.max_segments_per_row, a static cap:
it fixes the shapes at trace time). Padding (segment 0) is a run like any other, so every token is covered and
has a finite output. Which kernel runs is then chosen on the device, per batch (`segment_dispatch`):

  every row one run      plain causal flash attention (is_causal=True, no mask, no lengths)
  every row <= M runs    packed layout, mask type padding-causal (Hopper or newer, cuDNN >= 9.6)
  some row > M runs      the dense segment mask (exact, slower): correctness never depends on the data

max_segments_per_row=0 keeps only the dense path. With a sliding window the one-run and dense paths pass it as
cuDNN's local_window_size and the packed path is not used (its entry takes no window). `packed_reference_attention` is the same lengths/offsets
semantics in plain jnp (CPU tests check it equals the dense mask for random packings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from llm_jax.model import context as context_lib
from llm_jax.model.context import axes_size, axis_index
from llm_jax.model.layers import Projection, RMSNorm, Rope, apply_rope
from llm_jax.model.partitioning import active, constrain


@dataclasses.dataclass(frozen=True)
class MaskInfo:
  """What decides which key each query may see."""
  q_segment_ids: jax.Array  # [B,T] int32; 0 = padding
  kv_segment_ids: jax.Array  # [B,S]
  causal: bool
  q_offset: jax.Array | int = 0  # absolute index of query 0 in the key sequence (decoding with a cache)
  max_segments: int = 0  # static cap of segment runs per row for cuDNN's packed layout; 0 = dense mask only
  window: int = 0  # >0: a query sees only keys with query index - key index < window (sliding window); 0 = all

  def dense(self) -> jax.Array:
    """[B,T,S] bool: same segment, (if causal) key index <= query index, (if window) within the window."""
    t, s = self.q_segment_ids.shape[1], self.kv_segment_ids.shape[1]
    q_index = jnp.arange(t)[None, :] + jnp.asarray(self.q_offset).reshape(-1, 1)  # [1 or B, T]
    return index_mask(self.q_segment_ids, self.kv_segment_ids, q_index, jnp.arange(s), self.causal, self.window)

  def window_sides(self) -> tuple[int, int] | None:
    """(left, right) keys a query sees around itself, the form of cuDNN's and splash's local masks; None = all."""
    return mask_window(self.causal, self.window)


def index_mask(q_segment_ids, kv_segment_ids, q_index, k_index, causal: bool, window: int) -> jax.Array:
  """[B,T,S] bool, the one mask rule: same segment, (if causal) key index <= query index, (if window) within the
  window. q_index [T] or [B,T] and k_index [S] are sequence indices in input order (a context-parallel shard
  passes its own tokens', llm_jax/model/context.py)."""
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if causal or window:
    q_index = jnp.asarray(q_index).reshape(-1, q_segment_ids.shape[1], 1)
    k_index = jnp.asarray(k_index)[None, None, :]
    if causal:
      mask = mask & (k_index <= q_index)
    if window:  # causal: the window reaches back only; bidirectional (mlm): both ways
      mask = mask & (q_index - k_index < window)
      if not causal:
        mask = mask & (k_index - q_index < window)
  return mask


def soft_cap(logits: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(logits / cap): logits bounded to (-cap, cap), nearly unchanged well inside; cap 0 = none."""
  return cap * jnp.tanh(logits / cap) if cap else logits


def _masked_attention(q, k, v, mask, softcap: float = 0.0):
  """softmax(soft_cap(q.k / sqrt(H)), where mask [B,T,S]) . v in float32, queries grouped over their shared kv
  head."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
  logits = soft_cap(logits, softcap)
  logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v)
  return out.reshape(b, t, n, h)


def xla_attention(q, k, v, mask_info: MaskInfo, softcap: float = 0.0):
  """Reference kernel: the dense mask of MaskInfo."""
  return _masked_attention(q, k, v, mask_info.dense(), softcap)


def xla_context_local(mask, softcap: float = 0.0):
  """The xla kernel as context.sharded_attention's local kernel (context.LocalKernel): the dense `mask`
  (context.MaskFn) of a device's queries over the gathered keys."""
  def local(q, k, v, q_segment_ids, kv_segment_ids, q_index, k_index, shard):
    del shard
    return _masked_attention(q, k, v, mask(q_segment_ids, kv_segment_ids, q_index, k_index), softcap)
  return local


@dataclasses.dataclass(frozen=True)
class PackedSegments:
  """cuDNN's packed layout of a [B,T] segment-id batch with room for M runs per row."""
  seqlens: jax.Array  # [B,M] int32: tokens in run j of the row; -1 in slots past the row's last run
  offsets: jax.Array  # [B,M+1] int32: index of run j's first token; -1 in unused slots (the last is always -1)
  num_runs: jax.Array  # [B] int32: runs in the row (may exceed M: then the row does not fit)


def pack_segments(segment_ids: jax.Array, max_segments: int) -> PackedSegments:
  """Runs of equal ids, in order: [1,1,2,2,2,0,0] -> lengths [2,3,2], offsets [0,2,5]. A segment id must
  label one contiguous run (as every data source writes them); padding runs (id 0) count as runs."""
  b = segment_ids.shape[0]
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # [B,T] run index of each token
  num_runs = run[:, -1] + 1
  slots = jnp.arange(max_segments, dtype=jnp.int32)
  seqlens = jnp.sum(run[:, :, None] == slots, axis=1, dtype=jnp.int32)  # [B,M]
  offsets = jnp.cumsum(seqlens, axis=1, dtype=jnp.int32) - seqlens
  used = slots[None, :] < num_runs[:, None]
  seqlens = jnp.where(used, seqlens, -1)
  offsets = jnp.concatenate([jnp.where(used, offsets, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
  return PackedSegments(seqlens, offsets, num_runs)


def packed_mask(packed: PackedSegments, length: int, causal: bool) -> jax.Array:
  """[B,T,T] bool from lengths/offsets alone (no segment ids): same run, and key <= query if causal."""
  index = jnp.arange(length)[None, :, None]
  starts, seqlens = packed.offsets[:, None, :-1], packed.seqlens[:, None, :]
  in_run = (seqlens >= 0) & (index >= starts) & (index < starts + seqlens)  # [B,T,M]
  run = jnp.where(jnp.any(in_run, axis=-1), jnp.argmax(in_run, axis=-1), -1)  # [B,T], -1 = in no run
  mask = (run[:, :, None] == run[:, None, :]) & (run[:, :, None] >= 0)
  if causal:
    mask = mask & jnp.tril(jnp.ones((length, length), bool))[None]
  return mask


def packed_reference_attention(q, k, v, packed: PackedSegments, causal: bool):
  """What the cuDNN packed kernel computes, in plain jnp: attention within each run; a query in no run gives 0."""
  mask = packed_mask(packed, q.shape[1], causal)
  out = _masked_attention(q, k, v, mask)
  return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0).astype(out.dtype)


def segment_dispatch(q, k, v, mask_info: MaskInfo, *, single, packed, dense):
  """Picks, on the device and per batch, the cheapest exact kernel (module docstring):

    single(q, k, v)          every row is one run
    packed(q, k, v, layout)  every row has at most mask_info.max_segments runs (None: no packed kernel)
    dense(q, k, v)           otherwise
  """
  cap = mask_info.max_segments
  segments = mask_info.q_segment_ids
  if cap <= 0 or segments.shape != mask_info.kv_segment_ids.shape or not isinstance(mask_info.q_offset, int) \
      or mask_info.q_offset != 0:
    return dense(q, k, v)
  layout = pack_segments(segments, max(cap, 1))
  most = jnp.max(layout.num_runs)
  branches = [single, dense]
  index = jnp.where(most == 1, 0, 1)
  if packed is not None and cap > 1:
    branches.insert(1, lambda q, k, v: packed(q, k, v, layout))
    index = jnp.where(most == 1, 0, jnp.where(most <= cap, 1, 2))
  return jax.lax.switch(index, branches, q, k, v)


@functools.cache
def _cudnn_packed_api():
  """jax's cuDNN entry that takes packed lengths/offsets (jax._src, not public), or None where the installed
  jax lacks it: then only the one-run and dense paths are used."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    params = inspect.signature(fa.dot_product_attention).parameters
    if {'q_seqlen', 'kv_seqlen', 'q_offsets', 'kv_offsets', 'mask_type'} <= set(params) and \
        hasattr(fa.MaskType, 'PADDING_CAUSAL'):
      return fa
  except Exception:  # an import or signature change in a future jax: degrade, never fail
    pass
  return None


@contextlib.contextmanager
def cudnn_checks_for(devices):
  """Within this block, jax's cuDNN eligibility checks answer for `devices` (an ahead-of-time target).

  Those checks (which mask layouts, which architectures) ask the default backend's first GPU for its compute
  capability; compiling for an H100 from a CPU host, there is none, and the packed layout is refused as "not
  Hopper". Here they read the target devices' compute capability instead, for the duration of the compile only.
  Nothing changes when the devices are not GPUs, or when the host's own backend is the GPU.
  """
  device = next(iter(devices))
  capability = getattr(device, 'compute_capability', None)
  if platform_of([device]) != 'gpu' or not capability or jax.default_backend() == 'gpu':
    yield
    return
  from jax._src.cudnn import fused_attention_stablehlo as fa
  version = lambda text: tuple(int(x) for x in str(text).split('.'))  # noqa: E731
  target = version(capability)
  saved = fa.check_compute_capability, fa.is_cuda_compute_capability_equal
  fa.check_compute_capability = lambda wanted: target >= version(wanted)
  fa.is_cuda_compute_capability_equal = lambda wanted: target == version(wanted)
  try:
    yield
  finally:
    fa.check_compute_capability, fa.is_cuda_compute_capability_equal = saved


def cudnn_attention(q, k, v, mask_info: MaskInfo, softcap: float = 0.0, implementation: str = 'cudnn'):
  """cuDNN flash attention; GQA is native. No dense mask where the packing allows (module docstring); the
  sliding window goes in as local_window_size; no logit soft-cap (jax's cuDNN entry has none: refused, and
  model.check_config refuses the config first). (`implementation='xla'` runs the same calls on any backend: how
  tests check the arguments on CPU.)"""
  if softcap:
    raise ValueError(CUDNN_SOFTCAP)
  causal, window = mask_info.causal, mask_info.window_sides()

  def dense(q, k, v):
    segment_mask = mask_info.q_segment_ids[:, :, None] == mask_info.kv_segment_ids[:, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask[:, None], is_causal=causal,
                                        local_window_size=window, implementation=implementation)

  def single(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window,
                                        implementation=implementation)

  fa = _cudnn_packed_api() if implementation == 'cudnn' and window is None else None
  packed = None
  if fa is not None:
    def packed(q, k, v, layout: PackedSegments):
      mask_type = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
      return fa.dot_product_attention(q, k, v, q_seqlen=layout.seqlens, kv_seqlen=layout.seqlens,
                                      q_offsets=layout.offsets, kv_offsets=layout.offsets,
                                      scale=q.shape[-1] ** -0.5, mask_type=mask_type, qkv_layout='BTNH')
  return segment_dispatch(q, k, v, mask_info, single=single, packed=packed, dense=dense)


SPLASH_BLOCKS = (512, 256, 128)  # tile sizes tried, largest first: the first that divides the sequence is used


def splash_block(length: int) -> int | None:
  """The splash tile for a sequence of `length` tokens (None: no tile divides it; splash cannot run)."""
  return next((b for b in SPLASH_BLOCKS if length % b == 0), None)


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, *, causal, window, interpret, q_start: int = 0,
                  softcap: float = 0.0):
  """Splash on one device's shard: q [b,T,n,H], k/v [b,S,kv,H] with n % kv == 0 (GQA is native to the kernel:
  each kv head serves its group of query heads; nothing is repeated in memory). Query i sits at key index
  q_start + i (a context-parallel shard's queries over the whole key sequence)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  _, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if window:  # the window's left side (and, when causal, no right side) in one local mask
    head_mask = sm.LocalMask((t, s), window_size=window, offset=q_start)
  else:
    head_mask = sm.CausalMask((t, s), offset=q_start) if causal else sm.FullMask((t, s))
  block, block_kv = splash_block(t), splash_block(s)
  if block is None or block_kv is None:
    raise ValueError(f'splash attention needs sequence lengths divisible by {SPLASH_BLOCKS[-1]}, got {t} queries '
                     f'and {s} keys (under context parallelism: the chunk each device holds)')
  sizes = sk.BlockSizes(block_q=block, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block,
                        block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block, block_kv_dq=block_kv)
  mask = sm.MultiHeadMask([head_mask] * n)
  make = sk.make_splash_mqa_single_device if kv_heads == 1 else sk.make_splash_mha_single_device
  kernel = make(mask, block_sizes=sizes, interpret=interpret, attn_logits_soft_cap=softcap or None)
  # splash works per example on [heads, seq, head_dim] with pre-scaled queries.
  qt = jnp.swapaxes(q, 1, 2) * jnp.asarray(h ** -0.5, q.dtype)
  kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  if kv_heads == 1:
    kt, vt = kt[:, 0], vt[:, 0]
  segments = sk.SegmentIds(q=q_segment_ids, kv=kv_segment_ids)
  out = jax.vmap(kernel)(qt, kt, vt, segment_ids=segments)
  return jnp.swapaxes(out, 1, 2)


def splash_attention(q, k, v, mask_info: MaskInfo, softcap: float = 0.0, interpret: bool = False):
  """Pallas splash attention (TPU; `interpret=True` runs the same kernel on CPU, for tests).

  A Mosaic kernel cannot be partitioned by XLA, so under a mesh (the step's `activation_sharding` context) it
  runs inside shard_map: batch split as 'act_batch', query heads as 'act_heads' and kv heads as 'act_kv_heads'
  (the rules table), the sequence whole on every device. Where the kv heads are too few to split over the same
  mesh axes as the query heads (fewer kv heads than tensor shards), each device keeps every kv head and takes
  the one its query heads read.
  """
  local = functools.partial(_splash_local, causal=mask_info.causal, window=mask_info.window_sides(),
                            interpret=interpret, softcap=softcap)
  context = active()
  if context is None or context[0].size == 1:
    return local(q, k, v, mask_info.q_segment_ids, mask_info.kv_segment_ids)
  mesh, rules = context
  batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(('act_batch', 'act_seq', 'act_heads', None), rules)
  _, _, kv_axes, _ = nn.logical_to_mesh_axes(('act_batch', 'act_seq', 'act_kv_heads', None), rules)
  head_shards = axes_size(mesh, head_axes)
  n, kv_heads = q.shape[2], k.shape[2]
  if n % head_shards:
    raise ValueError(f'splash attention: {n} query heads do not split over {head_shards} devices ({head_axes})')
  if kv_heads % head_shards == 0 and kv_axes == head_axes:
    kv_spec, pick = P(batch_axes, None, head_axes, None), None
  elif head_shards % kv_heads == 0:  # fewer kv heads than shards: whole kv on each device, pick its one
    kv_spec = P(batch_axes, None, None, None)
    group, heads_per_shard = n // kv_heads, n // head_shards

    def pick(kv):
      return jax.lax.dynamic_slice_in_dim(kv, (axis_index(head_axes) * heads_per_shard) // group, 1, axis=2)
  else:
    raise ValueError(f'splash attention: {kv_heads} kv heads and {n} query heads cannot share '
                     f'{head_shards} tensor shards; use num_kv_heads divisible by (or dividing) {head_shards}')
  q_spec, seg_spec = P(batch_axes, None, head_axes, None), P(batch_axes, None)

  def body(q, k, v, q_segment_ids, kv_segment_ids):
    if pick is not None:
      k, v = pick(k), pick(v)
    return local(q, k, v, q_segment_ids, kv_segment_ids)

  sharded = jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                          out_specs=q_spec, check_vma=False)
  return sharded(q, k, v, mask_info.q_segment_ids, mask_info.kv_segment_ids)


def mask_window(causal: bool, window: int) -> tuple[int, int] | None:
  """(left, right) keys a query sees around itself (cuDNN's and splash's local masks); None = all."""
  return None if not window else (window - 1, 0 if causal else window - 1)


def _context_splash(q, k, v, q_segment_ids, kv_segment_ids, q_index, k_index, shard, *, causal, window,
                    interpret, load_balance, softcap: float = 0.0):
  """Splash inside the all_gather context exchange (context.sharded_attention's local kernel): the gathered
  keys back in input order (a local gather), then one splash call per run of this device's queries
  (context.query_runs: one, or an early and a late chunk), each with its static mask offset. The device's runs
  are static per device, so the kernels of all devices are built and lax.switch picks this one's."""
  del q_index, k_index
  length = k.shape[1]
  shards = length // q.shape[1]
  order = context_lib.token_order(length, shards, load_balance)
  k, v, kv_segment_ids = (context_lib.from_layout(x, order) for x in (k, v, kv_segment_ids))

  def device(runs):
    def attend(q, k, v, q_segment_ids, kv_segment_ids):
      outs, at = [], 0
      for start, size in runs:
        outs.append(_splash_local(q[:, at:at + size], k, v, q_segment_ids[:, at:at + size], kv_segment_ids,
                                  causal=causal, window=window, interpret=interpret, q_start=start,
                                  softcap=softcap))
        at += size
      return jnp.concatenate(outs, axis=1)
    return attend

  branches = [device(runs) for runs in context_lib.query_runs(length, shards, load_balance)]
  return jax.lax.switch(shard, branches, q, k, v, q_segment_ids, kv_segment_ids)


@dataclasses.dataclass(frozen=True)
class PageTable:
  """Where each row's keys and values live in a paged K/V pool (the serving engine's; llm_jax.serving).

  The pool of one layer is kv_pages [num_pages, page_size, 2K, H]: keys and values interleaved over the head axis
  (k0 v0 k1 v1 ...: key head j at 2j, value head j at 2j+1), the layout of jax's ragged paged attention kernel,
  which every paged kernel reads. Row b's token at position j sits in page pages[b, j // page_size] at offset
  j % page_size, so the page list of a row is its sequence in order and a key's index is its position. Page 0 is
  the null page: unused entries of `pages` point at it and padding tokens write into it; it is never read unmasked
  (its keys' indices lie past every query's position). `kernel` names the PAGED_KERNELS entry that attends over
  the pool, chosen once by the engine (`choose_paged_kernel`).
  """
  pages: jax.Array  # [B,P] int32
  page_size: int
  num_pages: int
  kernel: str = 'xla'

  def slots(self, positions: jax.Array, valid: jax.Array) -> jax.Array:
    """[B,T] pool slot (page * page_size + offset) of each token (slot 0, in the null page, for padding)."""
    page = jnp.take_along_axis(self.pages, positions // self.page_size, axis=1)
    return jnp.where(valid, page * self.page_size + positions % self.page_size, 0)

  def gather(self, pool: jax.Array) -> jax.Array:
    """[num_pages, page_size, ...] -> each row's slots in position order [B, P * page_size, ...]."""
    b, p = self.pages.shape
    return pool[self.pages].reshape((b, p * self.page_size) + pool.shape[2:])


jax.tree_util.register_dataclass(PageTable, data_fields=['pages'],
                                 meta_fields=['page_size', 'num_pages', 'kernel'])


def interleave_kv(k: jax.Array, v: jax.Array) -> jax.Array:
  """k, v [..., K, H] -> [..., 2K, H] as k0 v0 k1 v1 ... (the pool's layout)."""
  return jnp.stack([k, v], axis=-2).reshape(k.shape[:-2] + (2 * k.shape[-2], k.shape[-1]))


def paged_xla_attention(q, kv_pool, pages: PageTable, positions, valid, window: int = 0, softcap: float = 0.0):
  """Reference paged kernel: gather each row's pages, then the dense mask by position. q [B,T,N,H] at
  `positions` [B,T] (valid [B,T]: real tokens), kv_pool [num_pages, page_size, 2K, H] already holding this call's
  keys and values. A query sees the keys of its row at positions <= its own (and within the window): the row's
  earlier pages (a cached prefix, earlier chunks) and this chunk alike."""
  kv = pages.gather(kv_pool)  # [B,S,2K,H], key index = position
  k, v = kv[:, :, 0::2], kv[:, :, 1::2]
  key_positions = jnp.arange(k.shape[1])[None, None, :]
  mask = (key_positions <= positions[:, :, None]) & valid[:, :, None]
  if window:
    mask = mask & (positions[:, :, None] - key_positions < window)
  return _masked_attention(q, k, v, mask, softcap)


def _pages_per_block(pages_wide: int, page_size: int, queries: int) -> int:
  """Pages the blocked kernel reads per iteration: about 2x the queries per row in keys, 32 to 128 (measured on
  the 2-core CPU at 125m shapes: 32-key blocks are fastest for decode, 64-128 for 16-128-token prefill chunks),
  at least one page, and a divisor of the table's width so every block is whole."""
  want = max(1, min(128, max(32, 2 * queries)) // page_size)
  return max(d for d in range(1, min(want, pages_wide) + 1) if pages_wide % d == 0)


def paged_blocked_attention(q, kv_pool, pages: PageTable, positions, valid, window: int = 0, softcap: float = 0.0):
  """Attention over pages a block at a time with an online softmax (flash-decoding written in jnp): a loop
  gathers one block of each row's pages ([B, pages_per_block * page_size, 2K, H], small enough to stay in cache),
  scores it and folds it into running max / sum / output. The gather path materialises every row's whole table
  and splits keys from values with strided copies; this reads each live page once and never copies the whole
  context. The loop runs only over the blocks the batch's keys reach (its trip count is the longest row's, not
  the table's bucketed width) and, under a sliding window, starts at the first block any query still sees.
  Same contract and mask as paged_xla_attention (the reference; `softcap` > 0: logits soft-capped as there);
  padding queries come back as zeros."""
  b, t, n, h = q.shape
  kv_heads = kv_pool.shape[2] // 2
  per_block = _pages_per_block(pages.pages.shape[1], pages.page_size, t)
  block = per_block * pages.page_size
  query = q.reshape(b, t, kv_heads, n // kv_heads, h)
  last = jnp.max(jnp.where(valid, positions, -1))  # the furthest key any query sees
  stop = (last + block) // block
  first = jnp.min(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max))
  start = jnp.clip((first - window + 1) // block, 0, stop) if window else 0
  low = jnp.finfo(jnp.float32).min

  def fold(i, carry):
    best, total, out = carry  # [B,K,G,T], [B,K,G,T], [B,K,G,T,H] float32
    table = jax.lax.dynamic_slice_in_dim(pages.pages, i * per_block, per_block, axis=1)
    kv = kv_pool[table].reshape(b, block, 2 * kv_heads, h)
    k, v = kv[:, :, 0::2], kv[:, :, 1::2]
    key_positions = i * block + jnp.arange(block)
    mask = (key_positions[None, None, :] <= positions[:, :, None]) & valid[:, :, None]
    if window:
      mask = mask & (positions[:, :, None] - key_positions[None, None, :] < window)
    logits = jnp.einsum('BTKGH,BSKH->BKGTS', query, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    logits = jnp.where(mask[:, None, None], soft_cap(logits, softcap), low)
    new_best = jnp.maximum(best, logits.max(axis=-1))
    probs = jnp.exp(logits - new_best[..., None])
    scale = jnp.exp(best - new_best)
    total = total * scale + probs.sum(axis=-1)
    out = out * scale[..., None] + jnp.einsum('BKGTS,BSKH->BKGTH', probs.astype(v.dtype), v,
                                               preferred_element_type=jnp.float32)
    return new_best, total, out

  shape = (b, kv_heads, n // kv_heads, t)
  carry = (jnp.full(shape, low), jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (h,), jnp.float32))
  _, total, out = jax.lax.fori_loop(start, stop, fold, carry)
  out = (out / jnp.maximum(total, 1e-30)[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)


def ragged_supported(head_dim: int) -> bool:
  """Shapes jax's ragged paged attention kernel takes: its softmax statistics are 128 lanes wide, so head_dim
  must be a multiple of 128."""
  return head_dim % 128 == 0


def _ragged_layout(positions, valid):
  """Our [B,T] rows (each row's real tokens first, at consecutive positions: a prefill chunk or a decode token)
  as the ragged kernel's sequences. Rows with tokens go first (stable), so the kernel's `num_seqs` counts them.
  Returns (order [B], dest [B,T] index of each token in the packed queries (B*T for padding: dropped),
  kv_lens [B], cu_q_lens [B+1], num_seqs [1])."""
  b, t = valid.shape
  counts = valid.sum(axis=1).astype(jnp.int32)  # [B] query tokens of each row
  kv_lens = jnp.where(counts > 0, positions[:, 0] + counts, 0).astype(jnp.int32)  # keys up to the last query
  order = jnp.argsort(counts == 0, stable=True)  # live rows first
  cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts[order]).astype(jnp.int32)])
  rank = jnp.argsort(order)  # row -> its place among the kernel's sequences
  dest = cu_q_lens[rank][:, None] + jnp.arange(t)[None, :]
  dest = jnp.where(valid, dest, b * t)
  num_seqs = jnp.sum(counts > 0, dtype=jnp.int32).reshape(1)
  return order, dest, kv_lens[order], cu_q_lens, num_seqs


def _ragged_blocks(page_size: int, pages_per_seq: int, tokens: int) -> dict:
  """Block sizes: jax's tuned table on a TPU host (it asks jax.devices() which TPU it is); elsewhere (an
  ahead-of-time compile for a TPU target, the jnp reference) its default shape of 128 keys and 32 queries."""
  if platform_of(jax.devices()) == 'tpu':
    return {}
  return dict(num_kv_pages_per_block=min(pages_per_seq, max(1, 128 // page_size)),
              num_queries_per_block=min(tokens, 32))


def paged_ragged_attention(q, kv_pool, pages: PageTable, positions, valid, window: int = 0, softcap: float = 0.0,
                           *, reference: bool = False):
  """jax's Pallas TPU ragged paged attention (jax.experimental.pallas.ops.tpu.ragged_paged_attention): prefill
  chunks and decode tokens of any length in one kernel call that reads the pool's pages where they lie (no
  gather). Our rows become its ragged layout: the real tokens of every row packed one after another (cu_q_lens),
  each row's key count (kv_lens = its last position + 1: the kernel puts query i of a q_len-token sequence at
  kv_len - q_len + i, which is our positions since a row's tokens are consecutive), the page table as it is.

  `reference=True` calls jax's own jnp reference of the kernel (same layout; a Python loop over sequences, so
  eager only): how CPU tests check this adaptation, since the kernel itself lowers only for TPU (jax 0.10.2's
  Pallas interpreters do not run it). Under a mesh (the engine's activation_sharding context) the kernel runs
  inside shard_map over the heads ('act_heads' / 'act_kv_heads' on the same mesh axes, kv heads divisible by
  their shards); rows and pages are whole on every device.
  """
  from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa
  b, t, n, h = q.shape
  order, dest, kv_lens, cu_q_lens, num_seqs = _ragged_layout(positions, valid)
  packed = jnp.zeros((b * t, n, h), q.dtype).at[dest.reshape(-1)].set(q.reshape(b * t, n, h), mode='drop')
  table = pages.pages[order]
  options = dict(sm_scale=h ** -0.5, sliding_window=window or None, soft_cap=softcap or None)
  if reference:
    out = rpa.ref_ragged_paged_attention(packed, kv_pool, kv_lens, table, cu_q_lens, num_seqs, **options)
    out = jnp.concatenate([out, jnp.zeros((b * t - out.shape[0], n, h), out.dtype)])
  else:
    call = functools.partial(rpa.ragged_paged_attention, **options,
                             **_ragged_blocks(pages.page_size, table.shape[1], b * t))
    context = active()
    if context is not None and context[0].size > 1:
      call = _ragged_sharded(call, context, n, kv_pool.shape[2] // 2)
    out = call(packed, kv_pool, kv_lens, table, cu_q_lens, num_seqs)
  out = out[jnp.minimum(dest, b * t - 1)]  # [B,T,N,H]
  return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)


def _ragged_sharded(call, context, num_heads: int, kv_heads: int):
  """The ragged kernel inside shard_map: query heads and the pool's kv heads split alike over the tensor axes."""
  mesh, rules = context
  _, _, head_axes, _ = nn.logical_to_mesh_axes(('act_batch', 'act_seq', 'act_heads', None), rules)
  _, _, kv_axes, _ = nn.logical_to_mesh_axes(('act_batch', 'act_seq', 'act_kv_heads', None), rules)
  shards = axes_size(mesh, head_axes)
  if kv_axes != head_axes or num_heads % shards or kv_heads % shards:
    raise ValueError(f'ragged paged attention: {num_heads} query and {kv_heads} kv heads do not split alike over '
                     f'{shards} devices ({head_axes}, {kv_axes}); use the xla paged kernel')
  heads, pool = P(None, head_axes, None), P(None, None, head_axes, None)
  return jax.shard_map(call, mesh=mesh, in_specs=(heads, pool, P(), P(), P(), P()), out_specs=heads,
                       check_vma=False)


# Paged kernels (the serving engine's attention over a page pool), by name, one signature:
# kernel(q [B,T,N,H], kv_pool [num_pages, page_size, 2K, H], pages, positions [B,T], valid [B,T], window, softcap)
# -> [B,T,N,H].
# The plain gather is the reference and runs everywhere; 'blocked' reads a block of pages at a time (online
# softmax) and runs everywhere; 'ragged' is jax's Pallas TPU kernel (TPU only).
PAGED_KERNELS: dict[str, Callable] = {'xla': paged_xla_attention, 'blocked': paged_blocked_attention,
                                      'ragged': paged_ragged_attention}
PAGED_CHOICES = ('auto', *PAGED_KERNELS)  # EngineConfig.attention: a paged kernel, or auto (choose_paged_kernel)


def choose_paged_kernel(name: str, head_dim: int, platform: str = '') -> str:
  """Resolves the engine's 'auto' once: the ragged Pallas kernel on TPU where head_dim allows; on CPU the blocked
  kernel (measured: its batch-16 decode step 124 against the gather's 296 ms, docs/performance.md); elsewhere the xla gather (on GPU:
  the kernel measured there; jax's Pallas GPU paged_attention wants separate head-major k and v pages and
  decode-only batches, a layout this pool does not have)."""
  if name != 'auto':
    return name
  platform = platform or platform_of(jax.devices())
  if platform == 'tpu' and ragged_supported(head_dim):
    return 'ragged'
  return 'blocked' if platform == 'cpu' else 'xla'


KERNELS: dict[str, Callable] = {'xla': xla_attention, 'cudnn': cudnn_attention, 'splash': splash_attention}
CHOICES = ('auto', *KERNELS)  # config.model.attention: a kernel, or auto (choose_kernel)
PROJECTIONS = ('q', 'k', 'v', 'o')  # the attention's projections, by name (LoRA targets)


CUDNN_SOFTCAP = ('cuDNN attention has no logit soft-cap (model.attn_logit_softcap, Gemma 2): use model.attention=xla '
                 'or splash')


def cudnn_supported(head_dim: int, dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 256


def platform_of(devices) -> str:
  """'tpu', 'gpu' or 'cpu' for a sequence of devices (the mesh's): what the kernels are chosen for. NVIDIA and
  AMD devices (platform 'cuda' or 'rocm' when built from a deviceless topology) count as 'gpu'."""
  platform = next(iter(devices)).platform
  return 'gpu' if platform in ('cuda', 'rocm') else platform


def choose_kernel(name: str, head_dim: int, dtype, seq_len: int | None = None, platform: str = '',
                  decoding: bool = False, softcap: float = 0.0) -> str:
  """Resolves 'auto' once, from the platform the step compiles for and the shapes.

  `platform` is that of the mesh's devices (`platform_of`; Runtime passes it down through
  TransformerConfig.platform), so a compile for a TPU slice or an H100 from a CPU host takes the kernel
  training there would take; '' falls back to the default backend (a model built without a mesh).

  Decoding always uses xla, whatever `name` says: queries there sit at `q_offset` in a longer cache, which only
  the xla kernel's dense mask takes into account (the others assume T == S). A soft-capped model (`softcap`)
  never gets cuDNN from auto: it has no soft-cap.
  """
  if decoding:
    return 'xla'
  if name != 'auto':
    return name
  platform = platform or platform_of(jax.devices())
  if platform == 'gpu' and cudnn_supported(head_dim, dtype) and not softcap:
    return 'cudnn'
  if platform == 'tpu' and head_dim % 128 == 0 and (seq_len is None or splash_block(seq_len)):
    return 'splash'
  return 'xla'


class SelfAttention(nn.Module):
  """Grouped-query attention with RoPE: q/k/v projections, kernel dispatch, output projection."""
  num_heads: int
  num_kv_heads: int
  rope_theta: float | Rope  # base frequency, or a Rope with frequency scaling
  kernel: str = 'auto'
  causal: bool = True
  max_segments: int = 0  # MaskInfo.max_segments: static cap of runs per row for the packed cuDNN layout
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02
  lora_targets: Sequence[str] = ()
  lora_rank: int = 0
  lora_alpha: float = 16.0
  qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
  window: int = 0  # sliding window in tokens (0 = attend to the whole causal context)
  qk_norm: bool = False  # RMSNorm of q and k over all their heads at once, before RoPE (OLMoE)
  qk_norm_per_head: bool = False  # RMSNorm of each q and k head over head_dim, before RoPE (Qwen3, Gemma 3)
  norm_eps: float = 1e-5  # the q/k norms' epsilon
  norm_plus_one: bool = False  # the q/k norms scale by (1 + w) (Gemma's RMSNorm)
  head_dim: int = 0  # width of a head; 0 = d_model // num_heads
  query_pre_attn_scalar: float = 0.0  # logits scaled by its -1/2 power (Gemma); 0 = head_dim's, the usual
  softcap: float = 0.0  # logit soft-cap of every kernel (Gemma 2's attn_logit_softcapping); 0 = none
  platform: str = ''  # platform the step compiles for ('tpu', 'gpu', 'cpu'; '' = the default backend)
  context_exchange: str = 'all_gather'  # under a context mesh axis > 1: context.EXCHANGES
  context_load_balance: bool = False  # the sequence is in context.token_order's load-balanced layout
  gather_kernels: bool = False  # Projection.gather_kernel for q, k, v and o (set under remat)

  def _proj(self, name, features, axes, in_dims=1):
    rank = self.lora_rank if name in self.lora_targets else 0
    return Projection(features, axes, in_dims=in_dims, dtype=self.dtype, param_dtype=self.param_dtype,
                      init_std=self.init_std, lora_rank=rank, lora_alpha=self.lora_alpha,
                      use_bias=self.qkv_bias and name in ('q', 'k', 'v'), gather_kernel=self.gather_kernels,
                      name=name)

  @nn.compact
  def __call__(self, x, segment_ids, positions, decode: bool = False, pages: PageTable | None = None):
    d_model = x.shape[-1]
    head_dim = self.head_dim or d_model // self.num_heads
    n, kv = self.num_heads, self.num_kv_heads
    q = self._proj('q', (n, head_dim), ('embed', 'heads', 'head_dim'))(x)  # [B,T,N,H]
    k = self._proj('k', (kv, head_dim), ('embed', 'kv_heads', 'head_dim'))(x)  # [B,T,K,H]
    v = self._proj('v', (kv, head_dim), ('embed', 'kv_heads', 'head_dim'))(x)
    if self.qk_norm:
      q, k = self._norm_heads(q, 'q_norm'), self._norm_heads(k, 'k_norm')
    if self.qk_norm_per_head:  # one [H] scale for all heads: RMSNorm normalises the last axis
      q = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, self.norm_plus_one, name='q_norm')(q)
      k = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, self.norm_plus_one, name='k_norm')(k)
    if self.query_pre_attn_scalar:  # every kernel divides by sqrt(head_dim): the queries make up the difference
      q = q * jnp.asarray((head_dim / self.query_pre_attn_scalar) ** 0.5, q.dtype)
    q = constrain(apply_rope(q, positions, self.rope_theta), ('act_batch', 'act_seq', 'act_heads', None))
    k = constrain(apply_rope(k, positions, self.rope_theta), ('act_batch', 'act_seq', 'act_kv_heads', None))
    v = constrain(v, ('act_batch', 'act_seq', 'act_kv_heads', None))
    q, k, v = (checkpoint_name(t, name) for t, name in ((q, 'query_proj'), (k, 'key_proj'), (v, 'value_proj')))

    if pages is not None:  # the serving engine: keys and values into the page pool, attention over pages
      out = self._paged(q, k, v, segment_ids != 0, positions, pages)
      out = checkpoint_name(constrain(out, ('act_batch', 'act_seq', 'act_heads', None)), 'attention_out')
      return self._proj('o', (d_model,), ('heads', 'head_dim', 'embed'), in_dims=2)(out)
    if decode:
      k, v, kv_segment_ids, q_offset = self._update_cache(k, v, segment_ids)
      mask_info = MaskInfo(segment_ids, kv_segment_ids, self.causal, q_offset, window=self.window)
    else:
      mask_info = MaskInfo(segment_ids, segment_ids, self.causal, max_segments=self.max_segments,
                           window=self.window)
    platform = self.platform or platform_of(jax.devices())
    kernel = choose_kernel(self.kernel, head_dim, self.dtype, x.shape[1], platform, decoding=decode,
                           softcap=self.softcap)
    if not decode and context_lib.active_shards() > 1:
      out = self._context_parallel(q, k, v, segment_ids, kernel, platform)
    elif kernel == 'splash':  # the Mosaic kernel runs on CPU only in interpret mode (how tests check it)
      out = splash_attention(q, k, v, mask_info, self.softcap, interpret=platform == 'cpu')
    else:
      out = KERNELS[kernel](q, k, v, mask_info, self.softcap)
    out = checkpoint_name(constrain(out, ('act_batch', 'act_seq', 'act_heads', None)), 'attention_out')
    return checkpoint_name(self._proj('o', (d_model,), ('heads', 'head_dim', 'embed'), in_dims=2)(out), 'out_proj')

  def _context_parallel(self, q, k, v, segment_ids, kernel: str, platform: str):
    """Attention over a sequence split across the context axis (llm_jax/model/context.py), with the xla kernel:
    cuDNN and splash are not wired in (their causal masks assume queries and keys start together), so auto
    takes xla here and naming them is refused (model.check_config)."""
    mask = functools.partial(index_mask, causal=self.causal, window=self.window)
    shards = context_lib.active_shards()
    run = q.shape[1] // (shards * (2 if self.context_load_balance else 1))  # a device's contiguous queries
    if self.kernel == 'auto' and (kernel == 'cudnn' or self.context_exchange != 'all_gather' or
                                  (kernel == 'splash' and splash_block(run) is None)):
      kernel = 'xla'
    if kernel == 'xla':
      local = xla_context_local(mask, self.softcap)
    elif kernel == 'splash' and self.context_exchange == 'all_gather':
      local = functools.partial(_context_splash, causal=self.causal, window=mask_window(self.causal, self.window),
                                interpret=platform == 'cpu', load_balance=self.context_load_balance,
                                softcap=self.softcap)
    else:
      raise ValueError(f'context parallelism ({self.context_exchange}) does not run the {kernel} kernel '
                       f'(model.attention)')
    return context_lib.sharded_attention(q, k, v, segment_ids, segment_ids, exchange=self.context_exchange,
                                         load_balance=self.context_load_balance, mask=mask, local=local,
                                         softcap=self.softcap)

  def _paged(self, q, k, v, valid, positions, pages: PageTable):
    """Writes this call's k/v [B,T,K,H] into the layer's pool ('cache' collection: kv_pages
    [num_pages, page_size, 2K, H], keys and values interleaved; allocated by the engine) at their slots, then
    attends over the rows' pages with the kernel the page table names."""
    shape = (pages.num_pages, pages.page_size, 2 * k.shape[2], k.shape[3])
    pool = self.variable('cache', 'kv_pages', jnp.zeros, shape, k.dtype)
    slots = pages.slots(positions, valid).reshape(-1)
    new = interleave_kv(k, v).reshape((-1,) + shape[2:]).astype(pool.value.dtype)
    flat = pool.value.reshape((-1,) + shape[2:])
    pool.value = flat.at[slots].set(new).reshape(shape)
    return PAGED_KERNELS[pages.kernel](q, pool.value, pages, positions, valid, self.window, self.softcap)

  def _norm_heads(self, x, name):
    """RMSNorm over the flattened [N*H] of x [B,T,N,H] (one scale per head and channel), as OLMoE's q_norm."""
    flat = x.reshape(x.shape[:2] + (-1,))
    return RMSNorm(self.norm_eps, self.dtype, self.param_dtype, name=name)(flat).reshape(x.shape)

  def _update_cache(self, k, v, segment_ids):
    """Writes this call's keys/values [B,T,K,H] at the cache index and returns the whole cache.

    The cache ('cache' collection: cached_key, cached_value [B,S,K,H], cached_segment_ids [B,S], cache_index) is
    allocated zeroed by `transformer.init_cache` with S = the longest sequence to decode. One index serves the
    whole batch: prompts of different lengths are left-padded (segment id 0, never equal to a real token's), so
    every row writes its t-th token to the same slot. Slots not yet written have segment id 0 and lie after the
    queries, so they are never attended to.

    Returns (k, v [B,S,K,H], kv_segment_ids [B,S], q_offset: the slot of this call's first query).
    """
    # Named apart from the 'k' and 'v' projection submodules.
    cached_k = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
    cached_seg = self.variable('cache', 'cached_segment_ids', jnp.zeros, segment_ids.shape, jnp.int32)
    index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, i, 0, 0))
    cached_seg.value = jax.lax.dynamic_update_slice(cached_seg.value, segment_ids.astype(jnp.int32), (0, i))
    index.value = i + k.shape[1]
    return cached_k.value, cached_v.value, cached_seg.value, i
