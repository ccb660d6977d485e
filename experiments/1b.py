"""1B LLaMA shape (d_model 2048, 16 layers, 16 heads, ffn 5632, vocab 32000, seq 2048): the one-GPU benchmark."""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.d_model = 2048
  c.model.num_layers = 16
  c.model.num_heads = 16
  c.model.num_kv_heads = 16
  c.model.ffn_dim = 5632
  c.model.vocab_size = 32000
  c.model.max_seq_len = 2048
  c.data.seq_len = 2048
  c.data.global_batch_size = 8
  c.mesh.data = 1
  c.mesh.fsdp = -1  # one GPU: the same; a v5e-8 slice (16 GiB a chip) cannot hold a replica of the state
  c.train.steps = 100000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.eval.every = 2000
  c.checkpoint.every = 2000
  return c
