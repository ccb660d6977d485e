"""Mixtral 8x7B (MixtralForCausalLM: d_model 4096, 32 layers, 32 heads / 8 kv heads, 8 experts of 14336, 2 per
token, vocab 32000, rope_theta 1e6): 46.7B parameters stored, 12.9B active per token.

Pre-training (or continued training of an import: experiments/imported.py) on a v5p-64 slice (32 chips, one JAX
device each): experts split 8 ways over the expert axis, every weight and AdamW moment also sharded 4 ways over
fsdp, the batch over expert x fsdp = 32 devices (one 4096-token sequence each), full remat.

    python -m llm_jax.main --config=experiments/mixtral_8x7b.py --dry_run --target=v5p-64
"""

from llm_jax import config as base


def get_config():
  c = base.get_config()
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.ffn_dim = 14336
  c.model.vocab_size = 32000
  c.model.max_seq_len = 32768
  c.model.rope_theta = 1e6
  c.model.ffn = 'moe'
  c.model.num_experts = 8
  c.model.experts_per_token = 2
  c.model.expert_ffn_dim = 14336
  c.model.router_aux_loss_coef = 0.02  # Mixtral's config.json
  # Dropless grouped matmuls with the shard_map token dispatch (llm_jax/model/moe.py). On the v5p-64 AOT compile
  # (docs/moe.md): peak 36.3 GiB a device against the one-hot path's 62.0, all-gathers 61 GiB a step against 1135,
  # and matmul FLOPs counted at most 4.87 x the model's, as dense (the count takes every ragged_dot at its padded
  # worst-case rows; the TPU kernel skips the empty tiles, so the work is less, by an amount only a slice can show).
  c.model.moe_compute = 'ragged'
  c.model.remat = 'full'
  c.data.seq_len = 4096
  c.data.global_batch_size = 32
  c.mesh.data = 1
  c.mesh.expert = 8
  c.mesh.fsdp = -1  # 4 on v5p-64
  c.train.steps = 100000
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 2000
  c.eval.every = 2000
  c.checkpoint.every = 1000
  return c
