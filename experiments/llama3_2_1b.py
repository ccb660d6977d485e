"""Llama 3.2 1B shape (d_model 2048, 16 layers, 32 heads / 8 kv heads of 64, ffn 8192, vocab 128256, tied
embeddings, rope theta 500000 with llama3 scaling x32 from 8192, seq 8192): 1,235,814,400 parameters, the same as
meta-llama/Llama-3.2-1B. Import the released weights with `convert from_hf` to fine-tune them (docs/finetune.md).
"""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.d_model = 2048
  c.model.num_layers = 16
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.ffn_dim = 8192
  c.model.vocab_size = 128256
  c.model.tie_embeddings = True
  c.model.max_seq_len = 131072
  c.model.rope_theta = 500000.0
  c.model.rope_scaling = 'llama3'
  c.model.rope_scaling_factor = 32.0
  c.model.rope_low_freq_factor = 1.0
  c.model.rope_high_freq_factor = 4.0
  c.model.rope_original_max_len = 8192
  c.model.norm_eps = 1e-5
  c.model.remat = 'full'  # activations of 16 layers at seq 8192 (and 128k-vocab logits) dominate otherwise
  c.xla.gpu_memory_fraction = 0.9  # one H100: 65 GiB at peak (AOT compile), above JAX's default 75% (59.4 GiB)
  c.data.seq_len = 8192
  c.data.global_batch_size = 8
  c.train.steps = 100000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.eval.every = 2000
  c.checkpoint.every = 2000
  return c
