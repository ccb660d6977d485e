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
  # Sized to fit one H200 and a v5p-8 slice alike (docs/performance.md, "Presets on their targets"): 4 sequences
  # (one per v5p chip), the state sharded over every device, full remat. On one H200 the alternatives do not fit
  # at batch 4: minimal_with_context needs 153 GiB, and XLA's own rematerialisation then recomputes more than full
  # remat does (1.38 vs 1.25 x the model's matmul FLOPs, AOT compile). On a TPU slice, where memory is ample,
  # --config.model.remat=minimal recomputes nothing (1.000 x up to 5 sequences per v5p chip).
  c.model.remat = 'full'
  c.data.seq_len = 4096
  c.data.global_batch_size = 4
  c.mesh.data = 1
  c.mesh.fsdp = -1  # 7B of float32 weights and AdamW moments: sharded over every device
  c.xla.gpu_memory_fraction = 0.9  # one H200: 106.7 GiB of 140.4 at peak, above JAX's default 75% (105.3 GiB)
  c.train.steps = 100000
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2000
  c.eval.every = 2000
  c.checkpoint.every = 1000
  return c
