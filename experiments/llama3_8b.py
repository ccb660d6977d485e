"""Llama 3.1 8B shape (d_model 4096, 32 layers, 32 heads / 8 kv heads, ffn 14336, vocab 128256, rope theta 500000
with llama3 scaling x8 from 8192, seq 8192): 8,030,261,248 parameters, the same as meta-llama/Llama-3.1-8B.

To continue pre-training or fine-tune the released weights, import them first (docs/convert.md) and start from
that workdir: the imported config.json then carries exactly these fields, tokenizer and chat template included.
"""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.ffn_dim = 14336
  c.model.vocab_size = 128256
  c.model.max_seq_len = 131072  # Llama 3.1's context; training sequences are data.seq_len
  c.model.rope_theta = 500000.0
  c.model.rope_scaling = 'llama3'
  c.model.rope_scaling_factor = 8.0
  c.model.rope_low_freq_factor = 1.0
  c.model.rope_high_freq_factor = 4.0
  c.model.rope_original_max_len = 8192
  c.model.norm_eps = 1e-5
  c.model.remat = 'full'  # 32 layers at seq 8192: recompute everything rather than keep activations
  c.data.seq_len = 8192
  c.data.global_batch_size = 8
  c.mesh.data = 1
  c.mesh.fsdp = -1  # 8B of float32 weights + AdamW moments need sharding over every device
  c.train.steps = 100000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.eval.every = 2000
  c.checkpoint.every = 1000
  return c
