"""GPT-2-small-sized LLaMA model (about 125M parameters with a 32k vocabulary)."""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.d_model = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.num_kv_heads = 12
  c.model.ffn_dim = 2048
  c.model.max_seq_len = 1024
  c.data.seq_len = 1024
  c.data.global_batch_size = 64
  c.train.steps = 20000
  c.train.learning_rate = 6e-4
  c.train.warmup_steps = 1000
  c.eval.every = 1000
  c.checkpoint.every = 1000
  return c
