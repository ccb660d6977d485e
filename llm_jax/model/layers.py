"""Building blocks of a LLaMA-style decoder: projections with logical axes, RMSNorm, RoPE, SwiGLU MLP.

Shapes use letter codes: B batch, T query length, S key length, D d_model, N query heads, K kv heads,
H head_dim, F ffn_dim, V vocab. Parameters are stored in `param_dtype` and cast to `dtype` for compute.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llm_jax.model.partitioning import constrain


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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[-self.in_dims:]
    init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes)
    kernel = self.param('kernel', init, tuple(in_shape) + tuple(self.features), self.param_dtype)
    x = x.astype(self.dtype)
    contract = tuple(range(x.ndim - self.in_dims, x.ndim))
    y = jax.lax.dot_general(x, kernel.astype(self.dtype), ((contract, tuple(range(self.in_dims))), ((), ())))
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


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32 whatever the compute dtype."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the rotate-half layout (as Hugging Face LLaMA): x [B,T,N,H], positions [B,T].

  Pairs are (i, i + H/2), so Hugging Face q/k weights load without permutation.
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, half, dtype=np.float32) * 2.0 / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)): the LLaMA MLP."""
  ffn_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02
  lora_targets: Sequence[str] = ()
  lora_rank: int = 0
  lora_alpha: float = 16.0

  def _proj(self, name, features, axes):
    rank = self.lora_rank if name in self.lora_targets else 0
    return Projection(features, axes, dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std,
                      lora_rank=rank, lora_alpha=self.lora_alpha, name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    gate = checkpoint_name(self._proj('gate', (self.ffn_dim,), ('embed', 'mlp'))(x), 'mlp_gate')
    up = checkpoint_name(self._proj('up', (self.ffn_dim,), ('embed', 'mlp'))(x), 'mlp_up')
    h = constrain(nn.silu(gate) * up, ('act_batch', 'act_seq', 'act_mlp'))
    return checkpoint_name(self._proj('down', (d_model,), ('mlp', 'embed'))(h), 'mlp_out')
