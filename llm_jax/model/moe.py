"""The feed-forward layer of a block, chosen by config.model.ffn: the dense SwiGLU, or a mixture of experts.

    FFN_KINDS      ffn name -> builder of the block's FFN (the choices of config.model.ffn)
    EXPERT_COMPUTE moe_compute name -> how the chosen experts are evaluated (config.model.moe_compute)

A mixture of experts (`MoE`): a float32 router picks `experts_per_token` of `num_experts` SwiGLU experts per
token; the output is the routing-weighted sum of their outputs, plus an optional shared expert that every token
uses, gated by sigmoid(x . w) (Qwen2-MoE). Router semantics, all computed in float32 (as transformers does):

    probs = softmax(x . W_router)              over all experts
    weights, experts = top_k(probs, k)
    weights /= sum(weights)                    when router_norm_topk (Mixtral always; Qwen2-MoE and OLMoE: the HF
                                               config's norm_topk_prob)

Compute is dropless: every (token, expert) assignment is evaluated, none is dropped for capacity.
  ragged  the N*k assignments sorted by expert, each expert's run multiplied by its weights with
          `jax.lax.ragged_dot` (grouped matmuls): k/E of the dense work.
  dense   the reference: every expert on every token (einsums), combined with a one-hot [N,E] weight matrix.
          E/k times the work; the tests compare ragged against it.

On a mesh (the step's activation-sharding context) the routing and the ragged experts always run inside
shard_map over the batch shards (`route_tokens`, `sharded_experts`): left to XLA's partitioner, the top_k and the
argsort over a sharded token axis are all-gathered, and every device routes and multiplies every token (8 x the
work on 8 data-parallel devices); a sharded ragged_dot is not turned into a dispatch either (Mixtral on v5p-64
compiled to 19 x the active matmuls). With the experts whole on each device (mesh.expert=1, the default) that is
a local grouped matmul per data shard. A token count that does not divide the shards is padded with zero rows.

Expert parallelism (an 'expert' mesh axis > 1 splits the experts): Megatron's "allgather" dispatcher: the tokens
and their routing are all-gathered over the expert axes, each device runs its own experts' grouped matmuls on the
tokens routed to them, and a psum_scatter brings each token's sum back to its device. Chosen over an all-to-all because
a dropless dispatch must be static-shaped for the worst case (every token of the group on one device's experts):
  - jax.lax.ragged_all_to_all moves only the routed rows, but its receive buffer has that worst-case size all the
    same, and XLA:CPU does not implement it (jax 0.10.2), so the 8-fake-device tests could not run it;
  - a static all_to_all sends a worst-case block to every peer: with one expert per device (Mixtral) that is as
    many bytes as the all-gather.
Both leave the local grouped matmul on the same worst-case buffer of M * min(k, local experts) rows; TPU's
ragged_dot kernel skips the tiles past the routed rows, its weight gradient (a convolution) does not. Measured
on Mixtral 8x7B / v5p-64 in docs/moe.md.

Auxiliary losses go out through the objectives' door (`sow('aux_loss', ...)`, llm_jax.objectives.base), each a
sum over the batch's real tokens (segment id > 0), which the step divides by the real tokens of the whole step
whatever the objective divides its own loss by (pairs under DPO): a mean per token, so a coefficient means the
same under every objective. Each is divided by num_layers so the terms of all layers add up to their mean over
layers:

    moe_balance  router_aux_loss_coef * E * sum_i f_i * P_i   (Switch Transformer eq. 4-6, HF's normalisation:
                 f_i = top-k assignments to expert i per token (sums to k), P_i = mean router probability of i;
                 perfectly balanced routing gives k). HF pools f and P over layers before the product; we take
                 the product per layer, then the mean over layers (the Switch form).
    router_z     router_z_loss_coef * mean over tokens of logsumexp(router logits)^2 (ST-MoE).

The per-layer expert load (f_i / k, the share of assignments each expert gets) is sown to the 'moe_load'
collection, read by `expert_load` (nothing is stored when that collection is not mutable).
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from llm_jax.errors import check_choice, fail
from llm_jax.model.layers import SWIGLU_PROJECTIONS, Projection, SwiGLU
from llm_jax.model.partitioning import active, axis_names, constrain

AUX_COLLECTION = 'aux_loss'  # = llm_jax.objectives.base.AUX_COLLECTION (model/ imports no objectives; tested)
LOAD_COLLECTION = 'moe_load'


# ------------------------------------------------------------------------------------------------ routing


def route(logits: jax.Array, k: int, norm_topk: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """float32 router logits [N,E] -> (weights [N,k], experts [N,k] int32, probs [N,E])."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if norm_topk:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32), probs


def route_tokens(logits: jax.Array, k: int, norm_topk: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`route`, per token where each token is: under a mesh inside shard_map over the batch shards (XLA's
  partitioner all-gathers a top_k over a sharded token axis, so every device would route every token)."""
  context = active()
  if context is None:
    return route(logits, k, norm_topk)
  mesh, rules = context
  batch = _sized(mesh, _mesh_axes(rules)[0])
  spec = P(batch or None, None)
  logits, n = _pad_tokens(mesh, batch, logits)
  routed = jax.shard_map(lambda l: route(l, k, norm_topk), mesh=mesh, in_specs=(spec,), out_specs=(spec,) * 3)(
      logits)
  return tuple(a[:n] for a in routed)


def balance_terms(logits, probs, experts, real) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(E * sum_i f_i P_i, mean logsumexp^2, load f_i / k [E]) over the real tokens (`real` [N] float32)."""
  num_experts, k = probs.shape[-1], experts.shape[-1]
  count = jnp.maximum(jnp.sum(real), 1.0)
  assigned = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=1)  # [N,E], rows sum to k
  f = jnp.sum(assigned * real[:, None], axis=0) / count
  p = jnp.sum(probs * real[:, None], axis=0) / count
  z = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * real) / count
  return num_experts * jnp.sum(f * p), z, f / k


# ------------------------------------------------------------------------------------- expert computation


def ragged_experts(x, experts, weights, gate, up, down):
  """Dropless grouped matmuls. x [N,D], experts/weights [N,k], gate/up [E,D,F], down [E,F,D] -> [N,D] float32.

  Under a mesh (the step's `activation_sharding` context) they always run inside shard_map, each device on its
  own tokens: `sharded_experts`. Without one, every expert runs here on every token routed to it."""
  context = active()
  if context is not None:
    return sharded_experts(x, experts, weights, gate, up, down, *context)
  return _local_experts(x, experts, weights, gate, up, down, 0)


def _mesh_axes(rules):
  """(token axes, expert axes, embed axes, expert_mlp axes) of the rules table: mesh axis tuples, () for none. The
  tokens are the rows of [B,T] flattened, so they split over the axes of 'act_batch' and then of 'act_seq' (the
  context axis: each device routes and combines the tokens of its own sequence chunk)."""
  def axes(name):
    return axis_names(nn.logical_to_mesh_axes((name,), rules)[0])
  return axes('act_batch') + axes('act_seq'), axes('expert'), axes('embed'), axes('expert_mlp')


def _sized(mesh, axes) -> tuple:
  """The axes of `axes` larger than 1 (a size-1 axis shards nothing and its collectives are no-ops)."""
  return tuple(a for a in axes if mesh.shape[a] > 1)


def _pad_tokens(mesh, batch_axes, *arrays):
  """(arrays padded with zero rows to a multiple of the batch shards, the original row count): a token count that
  does not divide the shards (a scoring batch of 1 on 8 devices) is padded, never replicated."""
  n = arrays[0].shape[0]
  pad = -n % math.prod(mesh.shape[a] for a in batch_axes)
  if pad:
    arrays = tuple(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in arrays)
  return (*arrays, n)


def _first_local_expert(expert_axes, local_experts: int):
  """The global index of this device's first expert, inside shard_map (its shard along the expert axes)."""
  return jax.lax.axis_index(expert_axes) * local_experts if expert_axes else 0


def _local_experts(x, experts, weights, gate, up, down, first):
  """The contributions of experts first .. first+e-1 (gate/up [e,D,F], down [e,F,D]) to each of the tokens
  x [M,D] (routed to experts/weights [M,k]) -> [M,D] float32; zero from experts held elsewhere.

  A token picks an expert at most once, so at most M * min(k, e) assignments are local: the grouped matmuls run on
  that many rows (dropless, static-shaped), the local ones first, grouped by expert. The rows past the routed ones
  belong to no group, and ragged_dot leaves them unspecified (a backend may leave whatever the buffer held): they
  are selected away with jnp.where on the way in (so their input gradients cannot reach x) and on the way out."""
  m, k = experts.shape
  local_count = gate.shape[0]
  local = experts.reshape(-1) - first
  mine = (local >= 0) & (local < local_count)
  key = jnp.where(mine, local, local_count)  # the experts held elsewhere sort last, as one group
  order = jnp.argsort(key, stable=True)  # [M*k] assignment a = token a // k
  sizes = jnp.bincount(key, length=local_count + 1)[:local_count].astype(jnp.int32)
  rows = m * min(k, local_count)
  routed = (jnp.arange(rows) < jnp.sum(sizes))[:, None]  # [rows, 1]
  xs = jnp.where(routed, x[order[:rows] // k], 0)  # [rows, D]
  h = nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
  ys = jnp.where(routed, jax.lax.ragged_dot(h, down, sizes), 0)  # [rows, D]
  ys = jnp.pad(ys, ((0, m * k - rows), (0, 0)))[jnp.argsort(order)].reshape(m, k, -1)  # token order (a gather)
  weights = jnp.where(mine.reshape(m, k), weights, 0.0)
  # the combine is elementwise (not a dot): FLOPs count weights in matmuls (llm_jax.metrics)
  return jnp.sum(ys.astype(jnp.float32) * weights[..., None], axis=1)


def sharded_experts(x, experts, weights, gate, up, down, mesh, rules):
  """`ragged_experts` over a mesh, inside shard_map: each device starts from its own tokens and their routing (the
  token axis split over the mesh axes of 'act_batch', as `route_tokens` left them), nothing gathered across the
  batch beyond what expert parallelism needs:

    1. FSDP: each device all-gathers its experts' weights over the mesh axes of 'embed' (their transpose
       reduce-scatters the gradients back);
    2. dispatch (Megatron's "allgather" token dispatcher), only where the experts are split (the 'expert' rule's
       axes larger than 1): the tokens with their routing are all-gathered over those of the expert axes that
       also split the batch, so each device sees every token of its group of expert shards, and runs its own
       experts on the ones routed there (`_local_experts`);
    3. combine: a psum_scatter over the same axes sums each token's contributions and hands every device back its
       own tokens; a psum over expert axes that do not split the batch (the tokens were already there) and over
       the 'expert_mlp' axes (tensor: partial products of the split FFN width).

  With the experts whole on every device (mesh.expert=1, the default) step 2 and 3 vanish: a local grouped matmul
  per data shard, no collective beyond FSDP's. A token count that does not divide the batch shards (a scoring
  batch of 1 on 8 devices) is padded with zero-weight rows, never replicated. Each assignment is computed once,
  by the device that holds its expert: the single-device function up to the order of float32 sums."""
  batch, expert, embed, mlp = (_sized(mesh, axes) for axes in _mesh_axes(rules))
  num_experts, ep = gate.shape[0], math.prod(mesh.shape[a] for a in expert)
  if num_experts % ep:  # config.check_run refuses this first (model.num_experts over the 'expert' rule)
    fail('model.num_experts', f'{num_experts} experts do not split over mesh axes {"*".join(expert)} = {ep} devices')
  local_count = num_experts // ep
  gathered = tuple(a for a in expert if a in batch)  # tokens split over these: gathered, then scattered back
  summed = tuple(a for a in expert if a not in batch) + mlp  # tokens whole here: partial outputs summed
  x, experts, weights, n = _pad_tokens(mesh, batch, x, experts, weights)  # zero weights: zero rows, sliced off
  token_spec = P(batch or None, None)
  w_in = P(expert or None, embed or None, mlp or None)
  w_out = P(expert or None, mlp or None, embed or None)

  def body(x, experts, weights, gate, up, down):
    if embed:
      gate, up = (jax.lax.all_gather(w, embed, axis=1, tiled=True) for w in (gate, up))
      down = jax.lax.all_gather(down, embed, axis=2, tiled=True)
    if gathered:
      x, experts, weights = (jax.lax.all_gather(a, gathered, axis=0, tiled=True) for a in (x, experts, weights))
    y = _local_experts(x, experts, weights, gate, up, down, _first_local_expert(expert, local_count))
    if gathered:
      y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, summed) if summed else y

  sharded = jax.shard_map(body, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, w_in, w_in, w_out),
                          out_specs=token_spec)
  return sharded(x, experts, weights, gate, up, down)[:n]


def dense_experts(x, experts, weights, gate, up, down):
  """The reference: every expert on every token, combined by a one-hot [N,E] matrix of the routing weights."""
  combine = jnp.sum(jax.nn.one_hot(experts, gate.shape[0], dtype=jnp.float32) * weights[..., None], axis=1)
  h = nn.silu(jnp.einsum('ND,EDF->NEF', x, gate)) * jnp.einsum('ND,EDF->NEF', x, up)
  ys = jnp.einsum('NEF,EFD->NED', h, down)
  return jnp.sum(ys.astype(jnp.float32) * combine[..., None], axis=1)


EXPERT_COMPUTE: dict[str, Callable] = {'ragged': ragged_experts, 'dense': dense_experts}


# ----------------------------------------------------------------------------------------------- the layer


class MoE(nn.Module):
  """x [B,T,D] -> [B,T,D]: routed SwiGLU experts (+ a gated shared expert); see the module docstring."""
  num_experts: int
  experts_per_token: int
  expert_ffn_dim: int
  shared_ffn_dim: int = 0  # 0 = no shared expert
  norm_topk: bool = True
  aux_loss_coef: float = 0.0
  z_loss_coef: float = 0.0
  compute: str = 'ragged'
  num_layers: int = 1  # the auxiliary terms are divided by it (their sum over layers is the mean)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02

  def _experts_param(self, name, shape, axes):
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), axes)
    return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    b, t, d = x.shape
    e, f = self.num_experts, self.expert_ffn_dim
    flat = x.reshape(b * t, d)
    # the router in float32: a bfloat16 softmax would reorder near-tied experts
    logits = Projection((e,), ('embed', 'expert_router'), dtype=jnp.float32, param_dtype=self.param_dtype,
                        init_std=self.init_std, name='router')(flat)
    weights, experts, probs = route_tokens(logits, self.experts_per_token, self.norm_topk)
    self._sow_terms(logits, probs, experts, segment_ids.reshape(-1))

    gate = self._experts_param('gate', (e, d, f), ('expert', 'embed', 'expert_mlp'))
    up = self._experts_param('up', (e, d, f), ('expert', 'embed', 'expert_mlp'))
    down = self._experts_param('down', (e, f, d), ('expert', 'expert_mlp', 'embed'))
    y = EXPERT_COMPUTE[self.compute](flat.astype(self.dtype), experts, weights, gate, up, down)
    if self.shared_ffn_dim:
      shared = SwiGLU(self.shared_ffn_dim, self.dtype, self.param_dtype, self.init_std, name='shared')(flat)
      shared_gate = Projection((1,), ('embed', None), dtype=jnp.float32, param_dtype=self.param_dtype,
                               init_std=self.init_std, name='shared_gate')(flat)
      y = y + jax.nn.sigmoid(shared_gate) * shared.astype(jnp.float32)
    y = checkpoint_name(y.astype(self.dtype).reshape(b, t, d), 'mlp_out')
    return constrain(y, ('act_batch', 'act_seq', 'act_embed'))

  def _sow_terms(self, logits, probs, experts, segment_ids):
    real = (segment_ids > 0).astype(jnp.float32)
    balance, z, load = balance_terms(logits, probs, experts, real)
    tokens = jnp.sum(real)  # a sum over the tokens, as the door expects (the step divides by its real tokens)
    if self.aux_loss_coef:
      self.sow(AUX_COLLECTION, 'moe_balance', self.aux_loss_coef * balance * tokens / self.num_layers)
    if self.z_loss_coef:
      self.sow(AUX_COLLECTION, 'router_z', self.z_loss_coef * z * tokens / self.num_layers)
    self.sow(LOAD_COLLECTION, 'load', load)


# ------------------------------------------------------------------------------------------- the registry


def dense_ffn(cfg, dtype, param_dtype, lora: dict) -> Callable:
  """The LLaMA SwiGLU (the parameter tree and numbers of every model before MoE)."""
  mlp = SwiGLU(cfg.ffn_dim, dtype, param_dtype, cfg.init_std, activation=cfg.mlp_activation, name='mlp', **lora)
  return lambda h, segment_ids: mlp(h)


def moe_ffn(cfg, dtype, param_dtype, lora: dict) -> Callable:
  del lora  # adapters on experts are refused by check_config
  return MoE(cfg.num_experts, cfg.experts_per_token, cfg.expert_ffn_dim or cfg.ffn_dim,
             shared_ffn_dim=cfg.shared_expert_ffn_dim, norm_topk=cfg.router_norm_topk,
             aux_loss_coef=cfg.router_aux_loss_coef, z_loss_coef=cfg.router_z_loss_coef, compute=cfg.moe_compute,
             num_layers=cfg.num_layers, dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std, name='mlp')


FFN_KINDS: dict[str, Callable] = {'dense': dense_ffn, 'moe': moe_ffn}


def expert_load(model, params, batch: dict) -> jax.Array:
  """[num_layers, num_experts]: the share of top-k assignments each expert got, per layer, on this batch."""
  _, state = model.apply({'params': params}, batch['inputs'], batch['segment_ids'], batch['positions'],
                         mutable=[LOAD_COLLECTION])
  leaves = jax.tree.leaves(state.get(LOAD_COLLECTION, {}))
  if not leaves:
    return jnp.zeros((0, 0), jnp.float32)
  return jnp.concatenate([jnp.reshape(leaf, (-1, leaf.shape[-1])) for leaf in leaves], axis=0)


# ----------------------------------------------------------------------------------------------- validation


def check_config(config) -> None:
  """The config.model fields of a mixture of experts; ConfigError naming the first bad one."""
  m = config.model
  check_choice('model.ffn', m.ffn, FFN_KINDS)
  check_choice('model.moe_compute', m.moe_compute, EXPERT_COMPUTE)
  if m.ffn != 'moe':
    return
  if m.mlp_activation != 'silu':
    fail('model.mlp_activation', f'{m.mlp_activation} experts are not implemented; model.ffn=moe uses silu')
  if m.num_experts < 2:
    fail('model.num_experts', f'model.ffn=moe needs at least 2 experts, got {m.num_experts}')
  if not 1 <= m.experts_per_token <= m.num_experts:
    fail('model.experts_per_token', f'must be in [1, num_experts={m.num_experts}], got {m.experts_per_token}')
  for name in ('expert_ffn_dim', 'shared_expert_ffn_dim'):
    if m[name] < 0:
      fail(f'model.{name}', f'must be >= 0, got {m[name]}')
  for name in ('router_aux_loss_coef', 'router_z_loss_coef'):
    if m[name] < 0:
      fail(f'model.{name}', f'must be >= 0 (0 = off), got {m[name]}')
  lora = config.get('lora')
  if lora is not None and lora.rank:
    mlp_targets = sorted({t.strip() for t in lora.targets.split(',')} & set(SWIGLU_PROJECTIONS))
    if mlp_targets:
      fail('lora.targets', f'{",".join(mlp_targets)}: adapters on experts are not implemented; with model.ffn=moe '
           'use attention targets (q,k,v,o)')
