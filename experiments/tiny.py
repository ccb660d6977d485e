"""Tiny model on the embedded stdlib corpus: trains on 2 CPU cores in a few minutes (the README's main job)."""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.vocab_size = 2048
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.ffn_dim = 384
  c.model.max_seq_len = 256
  c.model.dtype = 'float32'  # CPUs gain nothing from bfloat16
  c.data.source = 'stdlib'
  c.data.seq_len = 128
  c.data.global_batch_size = 16
  c.train.steps = 600
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.01
  c.train.log_every = 25
  c.eval.every = 200
  c.eval.steps = 8
  c.checkpoint.every = 200
  c.checkpoint.keep = 2
  return c
