"""Gemma 3 4B language model shape (d_model 2560, 34 layers, 8 heads / 4 kv heads of head_dim 256 with per-head
(1 + w) q/k norms, GeGLU ffn 10240, vocab 262208 tied and scaled by sqrt(d_model), sandwich norms, five sliding
layers of 1024 tokens (RoPE base 10k) to one global (base 1e6, linear scaling 8), seq 4096): the parameter count of
the language model of google/gemma-3-4b (transformers' Gemma3ForCausalLM from the same config,
tests/test_hf_patterns.py). 34 layers are five repeats of the 6-layer pattern, scanned, and 4 layers unrolled.

To fine-tune the released weights, import them first (docs/convert.md: a Gemma3ForConditionalGeneration checkpoint
imports its language model) and start from that workdir.
"""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.d_model = 2560
  c.model.num_layers = 34
  c.model.num_heads = 8
  c.model.num_kv_heads = 4
  c.model.head_dim = 256
  c.model.qk_norm_per_head = True
  c.model.ffn_dim = 10240
  c.model.vocab_size = 262208
  c.model.tie_embeddings = True
  c.model.max_seq_len = 131072  # Gemma 3's context; training sequences are data.seq_len
  c.model.attention_pattern = ','.join(['sliding:1024@10000'] * 5 + ['global'])
  c.model.rope_theta = 1000000.0  # the global layers'
  c.model.rope_scaling = 'linear'
  c.model.rope_scaling_factor = 8.0
  c.model.norm = 'rms_plus_one'
  c.model.post_norms = True
  c.model.mlp_activation = 'gelu_tanh'
  c.model.embed_scale = True
  c.model.query_pre_attn_scalar = 256.0
  c.model.norm_eps = 1e-6
  c.model.remat = 'full'
  c.data.seq_len = 4096
  c.data.global_batch_size = 8
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.train.steps = 100000
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 2000
  c.eval.every = 2000
  c.checkpoint.every = 1000
  return c
