"""Splash attention (the Pallas TPU kernel) run on CPU in interpret mode against the xla reference kernel.

The same function training runs on a TPU (`attention.splash_attention`: shard_map over the mesh, GQA native),
on 1 device and on 8 fake devices (fsdp 4 x tensor 2), with random packings of documents and padding, grouped
query heads, MQA and a sliding window. Float32 inputs; tolerances: forward 2e-5 absolute (outputs are O(1)),
gradients 2e-4 of the largest gradient entry (the kernel's blockwise online softmax sums in another order).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llm_jax import config as config_lib
from llm_jax.model import attention
from llm_jax.model.partitioning import activation_sharding
from helpers import packed_segments

HEAD_DIM = 128
SEQ = 256


def _inputs(seed, batch, heads, kv_heads):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, SEQ, n, HEAD_DIM)), jnp.float32)
             for n in (heads, kv_heads, kv_heads))
  cotangent = jnp.asarray(rng.normal(size=(batch, SEQ, heads, HEAD_DIM)), jnp.float32)
  return q, k, v, jnp.asarray(packed_segments(rng, batch, SEQ, max_padding=40)), cotangent


def _fake_mesh(fsdp, tensor):
  sizes = {'fsdp': fsdp, 'tensor': tensor}
  shape = [sizes.get(axis, 1) for axis in config_lib.MESH_AXES]
  return Mesh(np.asarray(jax.devices()[:fsdp * tensor]).reshape(shape), config_lib.MESH_AXES)


def _value_and_grads(kernel, q, k, v, mask_info, cotangent, mesh):
  def loss(q, k, v):
    if mesh is None:
      out = kernel(q, k, v, mask_info)
    else:
      with activation_sharding(mesh, config_lib.DEFAULT_RULES):
        out = kernel(q, k, v, mask_info)
    return jnp.sum(out * cotangent), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _check(heads, kv_heads, window, mesh, seed=0, causal=True, batch=8):
  q, k, v, segments, cotangent = _inputs(seed, batch, heads, kv_heads)
  mask_info = attention.MaskInfo(segments, segments, causal, window=window)
  splash = lambda *a: attention.splash_attention(*a, interpret=True)  # noqa: E731
  want, want_grads = _value_and_grads(attention.xla_attention, q, k, v, mask_info, cotangent, None)
  got, got_grads = _value_and_grads(splash, q, k, v, mask_info, cotangent, mesh)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
  for name, g, w in zip('qkv', got_grads, want_grads):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-4 * scale, rtol=0, err_msg=f'd{name}')


def test_splash_equals_xla_one_device_gqa_packed():
  _check(heads=4, kv_heads=2, window=0, mesh=None, batch=2)


def test_splash_equals_xla_on_fsdp4_tensor2_with_window():
  # kv heads split over the tensor axis with their query groups; a sliding window of 64 tokens
  _check(heads=4, kv_heads=2, window=64, mesh=_fake_mesh(4, 2), seed=1)


def test_splash_mqa_on_tensor_mesh_takes_its_kv_head():
  # one kv head, two tensor shards: each shard keeps the whole kv and computes its half of the query heads
  _check(heads=4, kv_heads=1, window=0, mesh=_fake_mesh(4, 2), seed=2)


def test_splash_inside_shard_map_on_a_mesh():
  """Under a mesh, the kernel is called inside shard_map (a Mosaic call cannot be partitioned by XLA)."""
  q, k, v, segments, _ = _inputs(3, 8, 4, 2)
  mask_info = attention.MaskInfo(segments, segments, True)
  mesh = _fake_mesh(4, 2)

  def forward(q, k, v):
    with activation_sharding(mesh, config_lib.DEFAULT_RULES):
      return attention.splash_attention(q, k, v, mask_info, interpret=True)

  jaxpr = str(jax.make_jaxpr(forward)(q, k, v))
  assert 'shard_map' in jaxpr
  assert "'tensor'" in jaxpr.split('shard_map', 1)[1][:2000]  # heads split over tensor inside it


def test_auto_resolves_from_the_platform_not_the_host():
  bf16 = jnp.bfloat16
  assert attention.choose_kernel('auto', 128, bf16, 4096, platform='tpu') == 'splash'
  assert attention.choose_kernel('auto', 128, bf16, 4000, platform='tpu') == 'xla'  # no tile divides 4000
  assert attention.choose_kernel('auto', 64, bf16, 4096, platform='tpu') == 'xla'
  assert attention.choose_kernel('auto', 128, bf16, 4096, platform='gpu') == 'cudnn'
  assert attention.choose_kernel('auto', 128, jnp.float32, 4096, platform='gpu') == 'xla'
  assert attention.choose_kernel('auto', 128, bf16, 4096, platform='cpu') == 'xla'
  assert attention.choose_kernel('auto', 128, bf16, 4096) == 'xla'  # the host: CPU in tests
  assert attention.choose_kernel('splash', 128, bf16, 4096, platform='tpu', decoding=True) == 'xla'
