"""Qwen3 8B shape (d_model 4096, 36 layers, 32 heads / 8 kv heads of head_dim 128, per-head q/k RMSNorm, ffn 12288,
vocab 151936, untied, rope theta 1e6, seq 4096): the parameter count of Qwen/Qwen3-8B (transformers' model built
from the same config, tests/test_hf_patterns.py).

To continue pre-training or fine-tune the released weights, import them first (docs/convert.md) and start from
that workdir: the imported config.json then carries exactly these fields, tokenizer and chat template included.
"""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.d_model = 4096
  c.model.num_layers = 36
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.qk_norm_per_head = True
  c.model.ffn_dim = 12288
  c.model.vocab_size = 151936
  c.model.max_seq_len = 40960  # Qwen3's context; training sequences are data.seq_len
  c.model.rope_theta = 1000000.0
  c.model.norm_eps = 1e-6
  c.model.remat = 'full'  # 36 layers of 8B: recompute everything rather than keep activations
  c.data.seq_len = 4096
  c.data.global_batch_size = 8
  c.mesh.data = 1
  c.mesh.fsdp = -1  # 8B of float32 weights + AdamW moments need sharding over every device
  c.train.steps = 100000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.eval.every = 2000
  c.checkpoint.every = 1000
  return c
