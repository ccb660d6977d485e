"""The decoder: embedding -> blocks (scanned or unrolled, with a remat policy) -> RMSNorm -> logits.

`TransformerConfig` is a frozen copy of config.model (flax modules need hashable fields); the model never
reads the ml_collections config itself, so it can be built from a Hugging Face config too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.errors import check_choice, fail
from llm_jax.model import context, moe, output_head
from llm_jax.model.attention import CHOICES as ATTENTION_CHOICES
from llm_jax.model.attention import PROJECTIONS as ATTENTION_PROJECTIONS
from llm_jax.model.attention import PageTable, SelfAttention
from llm_jax.model.layer_pattern import LayerKind, kind_of_layer, parse_pattern
from llm_jax.model.attention import CUDNN_SOFTCAP, soft_cap
from llm_jax.model.layers import MLP_ACTIVATIONS, NORMS, ROPE_SCALINGS, SWIGLU_PROJECTIONS, RMSNorm, Rope
from llm_jax.model.moe import AUX_COLLECTION, FFN_KINDS, LOAD_COLLECTION
from llm_jax.model.partitioning import constrain

# Names tagged with checkpoint_name in the blocks.
MATMUL_OUTPUTS = ('query_proj', 'key_proj', 'value_proj', 'out_proj', 'mlp_gate', 'mlp_up', 'mlp_out')

# Primitives of jax's cuDNN flash-attention forward. Saving their outputs keeps the attention output *and* its
# softmax statistics, so the backward pass does not rerun the forward kernel: a checkpoint_name on the output
# alone cannot do that, the statistics being residuals inside jax's custom_vjp, which names do not reach.
CUDNN_ATTENTION_FORWARD = ('dot_product_attention_fwd_wrapper', 'dot_product_attention_fwd')


def save_names_and_attention_kernel(*names: str) -> Callable:
  """A jax.checkpoint policy: the values tagged with `names`, plus the cuDNN attention forward's outputs."""
  by_name = jax.checkpoint_policies.save_only_these_names(*names)

  def policy(prim, *args, **params):
    return prim.name in CUDNN_ATTENTION_FORWARD or by_name(prim, *args, **params)

  return policy


# Remat policy name -> jax.checkpoint policy (None = no remat: keep every activation).
REMAT_POLICIES: dict[str, Callable | None] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_matmuls': jax.checkpoint_policies.save_only_these_names(*MATMUL_OUTPUTS),
    'save_attention_out': jax.checkpoint_policies.save_only_these_names('attention_out', 'out_proj'),
    # As MaxText's minimal_with_context: the projections and the attention output with its softmax statistics;
    # not mlp_out, which no backward op reads (the down projection's input is recomputed from gate and up).
    # As MaxText's minimal: the projections and mlp_out, not the attention output (the splash backward reads the
    # kernel's own residuals, which no name reaches, so on TPU keeping the output saves no work).
    'minimal': jax.checkpoint_policies.save_only_these_names(
        'query_proj', 'key_proj', 'value_proj', 'out_proj', 'mlp_gate', 'mlp_up', 'mlp_out'),
    'minimal_with_context': save_names_and_attention_kernel(
        'query_proj', 'key_proj', 'value_proj', 'attention_out', 'out_proj', 'mlp_gate', 'mlp_up'),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  ffn_dim: int
  max_seq_len: int
  rope_theta: float = 10000.0
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  rope_yarn_beta_fast: float = 32.0
  rope_yarn_beta_slow: float = 1.0
  rope_attention_factor: float = 0.0
  qkv_bias: bool = False
  qk_norm: bool = False
  qk_norm_per_head: bool = False
  head_dim: int = 0  # 0 = d_model // num_heads; resolved in __post_init__, so cfg.head_dim is always the width
  ffn: str = 'dense'
  num_experts: int = 0
  experts_per_token: int = 2
  expert_ffn_dim: int = 0
  shared_expert_ffn_dim: int = 0
  router_norm_topk: bool = True
  router_aux_loss_coef: float = 0.0
  router_z_loss_coef: float = 0.0
  moe_compute: str = 'ragged'
  sliding_window: int = 0
  attention_pattern: str = 'global'
  norm_eps: float = 1e-5
  norm: str = 'rms'
  post_norms: bool = False
  mlp_activation: str = 'silu'
  embed_scale: bool = False
  query_pre_attn_scalar: float = 0.0
  attn_logit_softcap: float = 0.0
  final_logit_softcap: float = 0.0
  tie_embeddings: bool = False
  init_std: float = 0.02
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  logits_dtype: str = 'float32'
  logits_chunks: int = 1
  attention: str = 'auto'
  max_segments_per_row: int = 8
  remat: str = 'none'
  scan_layers: bool = True
  objective: str = 'clm'
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()
  platform: str = ''  # what the attention kernel is chosen for: the mesh's platform (tpu, gpu, cpu); '' = default backend
  context_exchange: str = 'all_gather'  # config.mesh.context_exchange: how attention exchanges K/V over a context axis
  context_load_balance: bool = False  # config.mesh.context_load_balance: the load-balanced sequence layout

  @classmethod
  def from_config(cls, config) -> 'TransformerConfig':
    """From the full ml_collections config (config.model plus config.lora)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.model.items() if k in fields}
    mesh = config.get('mesh')
    if mesh is not None:  # the context exchange is the model's business: the mesh only sizes the axis
      values.update(context_exchange=mesh.context_exchange, context_load_balance=mesh.context_load_balance)
    lora = config.get('lora')
    if lora is not None and lora.rank:
      values.update(lora_rank=lora.rank, lora_alpha=lora.alpha,
                    lora_targets=tuple(t.strip() for t in lora.targets.split(',') if t.strip()))
    return cls(**values)

  def __post_init__(self):
    object.__setattr__(self, 'head_dim', self.head_dim or self.d_model // self.num_heads)

  @property
  def rope(self) -> Rope:
    return Rope(theta=self.rope_theta, scaling=self.rope_scaling, factor=self.rope_scaling_factor,
                low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                original_max_len=self.rope_original_max_len, beta_fast=self.rope_yarn_beta_fast,
                beta_slow=self.rope_yarn_beta_slow, attention_factor=self.rope_attention_factor)

  @property
  def pattern(self) -> tuple[LayerKind, ...]:
    """The layer kinds of attention_pattern (layer_pattern.py), repeated over the layers."""
    return parse_pattern(self.attention_pattern)

  def norm_layer(self, name: str) -> RMSNorm:
    """An RMSNorm of the model's form (model.norm) named `name`."""
    return RMSNorm(self.norm_eps, jnp.dtype(self.dtype), jnp.dtype(self.param_dtype), self.norm == 'rms_plus_one',
                   name=name)

  def window_of(self, kind: LayerKind) -> int:
    """A layer's window: its kind's, or for a global kind the model's one sliding_window (0 = none)."""
    return kind.window or self.sliding_window

  def rope_of(self, kind: LayerKind) -> Rope:
    """A layer's RoPE: its kind's own base, unscaled, or the model's."""
    return Rope(theta=kind.rope_theta) if kind.rope_theta else self.rope


def head_dim_of(model_config) -> int:
  """The width of an attention head of a config.model: model.head_dim, or d_model // num_heads when it is 0."""
  return model_config.get('head_dim', 0) or model_config.d_model // model_config.num_heads


DTYPES = ('float32', 'bfloat16', 'float16')  # config.model.dtype, param_dtype and logits_dtype
LORA_TARGETS = ATTENTION_PROJECTIONS + SWIGLU_PROJECTIONS  # config.lora.targets: every projection by its name


def check_config(config) -> None:
  """The config.model fields the model reads (and config.lora's targets); ConfigError naming the first bad one.
  Shapes against the mesh are checked by config.check_run, the objective's fields by objectives.check_config."""
  m = config.model
  for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'ffn_dim', 'max_seq_len'):
    if m[name] <= 0:
      fail(f'model.{name}', f'must be positive, got {m[name]}')
  if m.head_dim < 0:
    fail('model.head_dim', f'must be >= 0 (0 = d_model // num_heads), got {m.head_dim}')
  if not m.head_dim and m.d_model % m.num_heads:
    fail('model.num_heads', f'{m.num_heads} heads do not divide d_model={m.d_model} (or set model.head_dim)')
  if m.num_heads % m.num_kv_heads:
    fail('model.num_kv_heads', f'{m.num_kv_heads} kv heads do not divide num_heads={m.num_heads}')
  if head_dim_of(m) % 2:
    fail('model.head_dim' if m.head_dim else 'model.num_heads',
         f'head_dim = {head_dim_of(m)} must be even for RoPE')
  if m.qk_norm and m.qk_norm_per_head:
    fail('model.qk_norm_per_head', 'qk_norm (over all heads, OLMoE) and qk_norm_per_head (Qwen3, Gemma 3) are two '
         'forms of the same norm: set one')
  if m.logits_chunks < 1:
    fail('model.logits_chunks', f'must be >= 1 (1 = the logits whole), got {m.logits_chunks}')
  for name in ('dtype', 'param_dtype', 'logits_dtype'):
    check_choice(f'model.{name}', m[name], DTYPES)
  check_choice('model.attention', m.attention, ATTENTION_CHOICES)
  check_choice('model.rope_scaling', m.rope_scaling, ROPE_SCALINGS)
  if m.rope_scaling != 'none' and m.rope_scaling_factor <= 0:
    fail('model.rope_scaling_factor', f'must be positive, got {m.rope_scaling_factor}')
  if m.rope_scaling == 'llama3':
    if not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
      fail('model.rope_high_freq_factor', f'llama3 scaling needs 0 < rope_low_freq_factor < rope_high_freq_factor, '
           f'got {m.rope_low_freq_factor} and {m.rope_high_freq_factor}')
    if m.rope_original_max_len <= 0:
      fail('model.rope_original_max_len', f'must be positive, got {m.rope_original_max_len}')
  if m.rope_scaling == 'yarn':
    if m.rope_original_max_len <= 0:
      fail('model.rope_original_max_len', f'must be positive, got {m.rope_original_max_len}')
    if not 0 < m.rope_yarn_beta_slow < m.rope_yarn_beta_fast:
      fail('model.rope_yarn_beta_fast', f'yarn needs 0 < rope_yarn_beta_slow < rope_yarn_beta_fast, got '
           f'{m.rope_yarn_beta_slow} and {m.rope_yarn_beta_fast}')
    if m.rope_attention_factor < 0:
      fail('model.rope_attention_factor', f'must be >= 0 (0 = from the factor), got {m.rope_attention_factor}')
  if m.sliding_window < 0:
    fail('model.sliding_window', f'must be >= 0 (0 = no window), got {m.sliding_window}')
  try:
    pattern = parse_pattern(m.attention_pattern)
  except ValueError as e:
    fail('model.attention_pattern', str(e))
  if m.sliding_window and any(kind.window for kind in pattern):
    fail('model.sliding_window', 'set either one window for every layer (sliding_window) or the sliding kinds of '
         f'model.attention_pattern={m.attention_pattern!r}, not both')
  if len(pattern) > m.num_layers:
    fail('model.attention_pattern', f'{len(pattern)} kinds for {m.num_layers} layers')
  check_choice('model.norm', m.norm, NORMS)
  check_choice('model.mlp_activation', m.mlp_activation, MLP_ACTIVATIONS)
  for name in ('query_pre_attn_scalar', 'attn_logit_softcap', 'final_logit_softcap'):
    if m[name] < 0:
      fail(f'model.{name}', f'must be >= 0 (0 = off), got {m[name]}')
  if m.attn_logit_softcap and m.attention == 'cudnn':
    fail('model.attention', CUDNN_SOFTCAP)
  check_choice('model.remat', m.remat, REMAT_POLICIES)
  mesh = config.get('mesh')
  if mesh is not None:
    check_choice('mesh.context_exchange', mesh.context_exchange, context.EXCHANGES)
    if mesh.context != 1 and m.attention == 'cudnn':
      fail('model.attention', 'cudnn does not run under context parallelism (mesh.context > 1); use auto, xla or '
           'splash')
    if mesh.context != 1 and m.attention == 'splash' and mesh.context_exchange != 'all_gather':
      fail('mesh.context_exchange', f'{mesh.context_exchange} runs the xla kernel only; splash (model.attention) '
           'runs inside all_gather')
  if not 0 <= m.max_segments_per_row <= m.max_seq_len:
    fail('model.max_segments_per_row', f'must be in [0, max_seq_len={m.max_seq_len}], got {m.max_segments_per_row}')
  moe.check_config(config)
  lora = config.get('lora')
  if lora is not None:
    if lora.rank < 0:
      fail('lora.rank', f'must be >= 0, got {lora.rank}')
    if lora.rank:
      for target in filter(None, lora.targets.split(',')):
        if target.strip() not in LORA_TARGETS:
          fail('lora.targets', f'unknown projection {target!r}; expected some of {",".join(LORA_TARGETS)}')


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x)), the FFN of model.ffn (moe.FFN_KINDS); with
  model.post_norms each branch's output is normalised too before it is added (Gemma's sandwich).
  `kind`: the layer's attention (its window and RoPE) in the model's attention_pattern."""
  cfg: TransformerConfig
  decode: bool = False
  kind: LayerKind = LayerKind()

  @nn.compact
  def __call__(self, x, segment_ids, positions, pages=None):
    cfg = self.cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    lora = dict(lora_targets=cfg.lora_targets, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    h = cfg.norm_layer('attn_norm')(x)
    # mlm is the one bidirectional objective (model/ imports no objectives: tested equal to Objective.causal)
    h = SelfAttention(cfg.num_heads, cfg.num_kv_heads, cfg.rope_of(self.kind), kernel=cfg.attention,
                          causal=cfg.objective != 'mlm', dtype=dtype, param_dtype=param_dtype,
                          init_std=cfg.init_std, max_segments=cfg.max_segments_per_row, qkv_bias=cfg.qkv_bias,
                          window=cfg.window_of(self.kind), qk_norm=cfg.qk_norm, qk_norm_per_head=cfg.qk_norm_per_head,
                          head_dim=cfg.head_dim, norm_eps=cfg.norm_eps, norm_plus_one=cfg.norm == 'rms_plus_one',
                          query_pre_attn_scalar=cfg.query_pre_attn_scalar, softcap=cfg.attn_logit_softcap,
                          platform=cfg.platform, context_exchange=cfg.context_exchange,
                          context_load_balance=cfg.context_load_balance,
                          gather_kernels=cfg.remat != 'none' and not self.decode, name='attn',
                          **lora)(h, segment_ids, positions, self.decode, pages)
    if cfg.post_norms:  # Gemma's sandwich: the branch's output normalised before the residual add
      h = cfg.norm_layer('post_attn_norm')(h)
    x = x + h
    h = cfg.norm_layer('mlp_norm')(x)
    h = FFN_KINDS[cfg.ffn](cfg, dtype, param_dtype, lora)(h, segment_ids)
    if cfg.post_norms:
      h = cfg.norm_layer('post_mlp_norm')(h)
    x = x + h
    return constrain(x, ('act_batch', 'act_seq', 'act_embed'))


class ScannedBlock(Block):
  """A Block with the (carry, out) signature nn.scan expects."""

  def __call__(self, x, segment_ids, positions, pages=None):
    return super().__call__(x, segment_ids, positions, pages), None


class PatternGroup(nn.Module):
  """One repeat of the attention pattern (block_0 ... block_{P-1}, each with its kind): what nn.scan scans when
  the layers differ, since a scanned body must be the same function at every step."""
  cfg: TransformerConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, segment_ids, positions, pages=None):
    for j, kind in enumerate(self.cfg.pattern):
      x = Block(self.cfg, self.decode, kind, name=f'block_{j}')(x, segment_ids, positions, pages)
    return x, None


class Transformer(nn.Module):
  """tokens [B,T] -> logits [B,T,V]. segment_ids (0 = padding) and positions default to one document.

  `pages` (attention.PageTable, with decode=True): the serving engine's paged K/V; the 'cache' collection then
  holds each layer's page pool, and segment ids only mark real tokens (non-zero) from padding.
  `logits_at` [B,K] (indices into T): logits of those positions only, [B,K,V] (a prefill needs its last one).
  `reduce` (reducer, extra): instead of the logits, reducer(logits [B,C,V], extra [B,C,...]) -> per-token values
  for all T tokens, computed over cfg.logits_chunks strided chunks of the tokens (output_head.reduce_in_chunks):
  what a loss takes, without the whole [B,T,V] logits.
  """
  cfg: TransformerConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, pages: PageTable | None = None, logits_at=None,
               reduce: tuple[output_head.Reducer, object] | None = None):
    cfg = self.cfg
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                 ('vocab', 'embed')), name='embed')
    # Under context parallelism with load balancing the tokens take the devices' layout (context.token_order):
    # positions and segment ids move with them; what leaves the model returns to input order (context.py).
    order = None
    if not self.decode and pages is None:
      order = context.token_order(tokens.shape[1], context.active_shards(), cfg.context_load_balance)
    tokens, segment_ids, positions = (context.to_layout(a, order) for a in (tokens, segment_ids, positions))
    x = embed(tokens)
    if cfg.embed_scale:  # in the compute dtype, as transformers' Gemma (sqrt(d_model) rounded to it first)
      x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
    x = constrain(x, ('act_batch', 'act_seq', 'act_embed'))
    x = self._blocks(x, segment_ids, positions, pages)
    if reduce is None:  # a loss's per-token values need no input order: they leave the layout instead (below)
      x = context.from_layout(x, order)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    x = cfg.norm_layer('final_norm')(x)
    if cfg.tie_embeddings:
      weight = embed.embedding
    else:
      weight = output_head.HeadKernel(cfg.vocab_size, cfg.init_std, jnp.dtype(cfg.param_dtype),
                                      name='lm_head')(cfg.d_model)

    def logits_of(h, weight, pin=True):
      logits = output_head.head_logits(h, weight, jnp.dtype(cfg.dtype), cfg.tie_embeddings)
      if pin:
        logits = constrain(logits, ('act_batch', 'act_seq', 'act_vocab'))
      if cfg.final_logit_softcap:  # in float32: tanh saturates, and bfloat16 would round the cap's neighbourhood
        logits = soft_cap(logits.astype(jnp.float32), cfg.final_logit_softcap)
      return logits.astype(jnp.dtype(cfg.logits_dtype))

    if reduce is None:
      return logits_of(x, weight)
    # The per-token values are computed in the devices' layout (load-balanced context parallelism) with `extra`
    # taken into it, and only they return to input order: moving the hidden states back would gather the whole
    # sequence's [T, d_model] on every device.
    reducer, extra = reduce
    extra = jax.tree.map(lambda a: context.to_layout(a, order), extra)
    out = output_head.reduce_in_chunks(x, weight, logits_of, reducer, extra, cfg.logits_chunks,
                                       ('vocab', 'embed') if cfg.tie_embeddings else ('embed', 'vocab'))
    return jax.tree.map(lambda a: context.from_layout(a, order), out)

  def _blocks(self, x, segment_ids, positions, pages):
    """The layers (layer_pattern.layer_location says where each one's parameters are): scanned, one block per
    step when every layer has the same kind, else one repeat of the pattern per step and the layers after the
    last whole repeat unrolled; or all unrolled."""
    cfg = self.cfg
    policy = REMAT_POLICIES[cfg.remat]
    remat = cfg.remat != 'none' and not self.decode  # decoding takes no gradients: nothing to rematerialise
    pattern = cfg.pattern
    first_unrolled = 0
    if cfg.scan_layers:
      grouped = len(pattern) > 1
      body = PatternGroup if grouped else ScannedBlock
      if remat:
        body = nn.remat(body, policy=policy, prevent_cse=False)
      # the sown collections (auxiliary losses, expert load) stack per layer like the parameters
      stack = nn.scan(body, variable_axes={'params': 0, 'cache': 0, AUX_COLLECTION: 0, LOAD_COLLECTION: 0},
                      split_rngs={'params': True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers // len(pattern),
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      extra = {} if grouped else {'kind': pattern[0]}
      x, _ = stack(cfg, self.decode, name='layers', **extra)(x, segment_ids, positions, pages)
      first_unrolled = cfg.num_layers // len(pattern) * len(pattern)
    block_cls = Block
    if remat:
      block_cls = nn.remat(block_cls, policy=policy)
    for i in range(first_unrolled, cfg.num_layers):
      x = block_cls(cfg, self.decode, kind_of_layer(pattern, i), name=f'layers_{i}')(x, segment_ids, positions,
                                                                                      pages)
    return x


def init_cache(cfg: TransformerConfig, batch_size: int, max_len: int) -> dict:
  """A zeroed KV cache for `Transformer(cfg, decode=True)`: per layer cached_key, cached_value [B,S,K,H],
  cached_segment_ids [B,S] and cache_index (see SelfAttention._update_cache).

  Scanned layers stack it on a leading [L] axis (like their parameters). Shapes come from `jax.eval_shape`, so
  nothing but the zeros is computed.
  """
  model = Transformer(cfg, decode=True)
  tokens = jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
