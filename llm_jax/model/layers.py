"""Building blocks of a LLaMA-style decoder: projections with logical axes, RMSNorm, RoPE, SwiGLU MLP.

Shapes use letter codes: B batch, T query length, S key length, D d_model, N query heads, K kv heads,
H head_dim, F ffn_dim, V vocab. Parameters are stored in `param_dtype` and cast to `dtype` for compute.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llm_jax.model.partitioning import constrain, gather_for_matmul


class Projection(nn.Module):
  """y = x . W, contracting the last `in_dims` axes of x with the leading axes of W.

  W has shape x.shape[-in_dims:] + features and logical names `kernel_axes`, so one class covers the q/k/v
  projections (D -> N,H), the output projection (N,H -> D) and the MLP.
  """
  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  in_dims: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02
  lora_rank: int = 0  # >0 adds a low-rank adapter (see llm_jax.model.lora), trained while W stays frozen
  lora_alpha: float = 16.0
  use_bias: bool = False  # + b, b of shape `features` (Qwen2's q/k/v), zero-initialised
  # The compute-dtype W pinned whole over the batch's mesh axes (partitioning.gather_for_matmul), so every dot that
  # reads it (a remat's recompute and the backward's transpose) shares one gather. Only under remat: without it
  # the gathered W would be kept from the forward to the backward, a whole weight per layer.
  gather_kernel: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[-self.in_dims:]
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes)
    kernel = self.param('kernel', init, tuple(in_shape) + tuple(self.features), self.param_dtype)
    x = x.astype(self.dtype)
    contract = tuple(range(x.ndim - self.in_dims, x.ndim))
    kernel = kernel.astype(self.dtype)
    if self.gather_kernel:
      kernel = gather_for_matmul(kernel, self.kernel_axes)
    y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(self.in_dims))), ((), ())))
    if self.use_bias:
      bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[self.in_dims:])
      y = y + self.param('bias', bias_init, tuple(self.features), self.param_dtype).astype(self.dtype)
    if self.lora_rank:
      y = y + self._lora(x, in_shape, contract)
    return y

  def _lora(self, x, in_shape, contract):
    """B(A x) * alpha/rank; B starts at zero so a fresh adapter leaves the model unchanged."""
    rank = self.lora_rank
    a_axes = self.kernel_axes[:self.in_dims] + ('lora_rank',)
    b_axes = ('lora_rank',) + self.kernel_axes[self.in_dims:]
    fan_in = int(np.prod(in_shape))
    lora_a = self.param('lora_a', nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5), a_axes),
                        tuple(in_shape) + (rank,), self.param_dtype)
    lora_b = self.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros, b_axes),
                        (rank,) + tuple(self.features), self.param_dtype)
    h = jax.lax.dot_general(x, lora_a.astype(self.dtype), ((contract, tuple(range(self.in_dims))), ((), ())))
    y = jax.lax.dot_general(h, lora_b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return y * (self.lora_alpha / rank)


NORMS = ('rms', 'rms_plus_one')  # RMSNorm's scale: w (LLaMA), or 1 + w with w starting at 0 (Gemma)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32 whatever the compute dtype; scale = 1 + w when `plus_one` (Gemma's
  form: w is stored and starts at zero)."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  plus_one: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param('scale', nn.with_logical_partitioning(init, ('norm',)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(jnp.float32) + (1.0 if self.plus_one else 0.0)
    return (y * scale).astype(self.dtype)


ROPE_SCALINGS = ('none', 'linear', 'llama3', 'yarn')  # implemented RoPE frequency scalings (Hugging Face rope_type names)


@dataclasses.dataclass(frozen=True)
class Rope:
  """RoPE frequencies: base `theta` and an optional scaling of the frequencies for longer contexts.

    none    inv_freq_i = theta^(-2i/H)
    linear  inv_freq / factor (position interpolation)
    llama3  Llama 3.1's: wavelengths above original_max_len/low_freq_factor are divided by `factor`, those
            below original_max_len/high_freq_factor kept, and the band between interpolated smoothly.
    yarn    YaRN (Qwen, DeepSeek): dimensions that turn fewer than beta_slow times over original_max_len are
            divided by `factor`, those that turn more than beta_fast times kept, a linear ramp between (bounds
            floored and ceiled, as transformers' truncate=True); cos and sin are multiplied by the attention
            factor (`attention_scaling`: 0.1 ln(factor) + 1 unless given), which scales the logits by its square.

  Same formulas as transformers' modeling_rope_utils, so imported checkpoints compute the same function.
  """
  theta: float = 10000.0
  scaling: str = 'none'
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  attention_factor: float = 0.0  # yarn: multiplies cos and sin; 0 = 0.1 ln(factor) + 1 (1 for factor <= 1)

  def attention_scaling(self) -> float:
    """The factor cos and sin are multiplied by (1 except under yarn)."""
    if self.scaling != 'yarn':
      return 1.0
    if self.attention_factor:
      return float(self.attention_factor)
    return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

  def inv_freq(self, head_dim: int) -> np.ndarray:
    """[H/2] float32 inverse frequencies (static: computed when tracing)."""
    half = head_dim // 2
    inv_freq = 1.0 / (self.theta ** (np.arange(0, half, dtype=np.float32) * 2.0 / head_dim))
    if self.scaling == 'linear':
      inv_freq = inv_freq / np.float32(self.factor)
    elif self.scaling == 'llama3':
      low_wavelen = self.original_max_len / self.low_freq_factor
      high_wavelen = self.original_max_len / self.high_freq_factor
      wavelen = 2 * math.pi / inv_freq
      scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
      smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (self.high_freq_factor -
                                                                           self.low_freq_factor)
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
      inv_freq = np.where(medium, smoothed, scaled)
    elif self.scaling == 'yarn':
      # the dimension index (of head_dim) at which a frequency turns `rotations` times over original_max_len
      turns = lambda rotations: (head_dim * math.log(self.original_max_len / (rotations * 2 * math.pi)) /  # noqa: E731
                                 (2 * math.log(self.theta)))
      low = max(math.floor(turns(self.beta_fast)), 0)
      high = min(math.ceil(turns(self.beta_slow)), head_dim - 1)
      high = high + 0.001 if high == low else high
      ramp = np.clip((np.arange(half, dtype=np.float32) - low) / (high - low), 0, 1)  # 0: keep, 1: interpolate
      inv_freq = inv_freq / np.float32(self.factor) * ramp + inv_freq * (1 - ramp)
    elif self.scaling != 'none':
      raise ValueError(f'unknown rope scaling {self.scaling!r}; expected one of {ROPE_SCALINGS}')
    return np.asarray(inv_freq, np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float | Rope) -> jax.Array:
  """Rotary embedding in the rotate-half layout (as Hugging Face LLaMA): x [B,T,N,H], positions [B,T].

  Pairs are (i, i + H/2), so Hugging Face q/k weights load without permutation. `theta` is the base frequency,
  or a `Rope` with a frequency scaling.
  """
  rope = theta if isinstance(theta, Rope) else Rope(theta=theta)
  inv_freq = rope.inv_freq(x.shape[-1])
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
  scale = rope.attention_scaling()
  sin = jnp.sin(angles)[:, :, None, :] * scale
  cos = jnp.cos(angles)[:, :, None, :] * scale
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


SWIGLU_PROJECTIONS = ('gate', 'up', 'down')  # SwiGLU's projections, by name (LoRA targets)
# The gated MLP's activation, by config.model.mlp_activation: silu (SwiGLU, LLaMA) or the tanh approximation of GELU
# (GeGLU, Gemma's gelu_pytorch_tanh).
MLP_ACTIVATIONS = {'silu': nn.silu, 'gelu_tanh': functools.partial(nn.gelu, approximate=True)}


class SwiGLU(nn.Module):
  """down(act(gate(x)) * up(x)): the LLaMA MLP with act = silu; GeGLU (Gemma) with act = gelu_tanh."""
  ffn_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02
  lora_targets: Sequence[str] = ()
  lora_rank: int = 0
  lora_alpha: float = 16.0
  activation: str = 'silu'  # a name in MLP_ACTIVATIONS

  def _proj(self, name, features, axes):
    rank = self.lora_rank if name in self.lora_targets else 0
    return Projection(features, axes, dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std,
                      lora_rank=rank, lora_alpha=self.lora_alpha, name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    gate = checkpoint_name(self._proj('gate', (self.ffn_dim,), ('embed', 'mlp'))(x), 'mlp_gate')
    up = checkpoint_name(self._proj('up', (self.ffn_dim,), ('embed', 'mlp'))(x), 'mlp_up')
    h = constrain(MLP_ACTIVATIONS[self.activation](gate) * up, ('act_batch', 'act_seq', 'act_mlp'))
    return checkpoint_name(self._proj('down', (d_model,), ('mlp', 'embed'))(h), 'mlp_out')
