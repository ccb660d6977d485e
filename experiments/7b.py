"""LLaMA-2-7B (d_model 4096, 32 layers, 32 heads, ffn 11008, vocab 32000, seq 4096): 6,738,415,616 parameters."""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.ffn_dim = 11008
  c.model.vocab_size = 32000
  c.model.max_seq_len = 4096
  c.model.norm_eps = 1e-5
  # activations of 32 layers at seq 4096 do not fit without remat; keeps the attention output and its softmax
  # statistics (no second cuDNN forward in the backward pass), drops mlp_out (docs/performance.md)
  c.model.remat = 'minimal_with_context'
  c.data.seq_len = 4096
  c.data.global_batch_size = 2
  c.train.steps = 100000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.eval.every = 2000
  c.checkpoint.every = 1000
  return c
