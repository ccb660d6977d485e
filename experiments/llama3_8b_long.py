"""Llama 3.1 8B (experiments/llama3_8b.py) trained on 64k-token sequences with context parallelism.

One 65,536-token sequence does not fit a device: its activations are split over a context axis of 4
(config.mesh.context; llm_jax/model/context.py), K/V all-gathered per layer (8 kv heads: a quarter of the queries
each), load-balanced causal chunks (device i holds chunks i and 7-i of 8) so that splash, which model.attention=auto
takes on TPU (each device's chunks are 8192 tokens), does even work on every device. The weights and optimizer
state stay sharded over fsdp x context. fsdp takes the devices left (a v5p-8's 4 chips: fsdp 1; an 8-GPU node: 2).
The loss computes the output head in 16 chunks of the tokens (model.logits_chunks; model/output_head.py): whole,
the logits of 32,768 tokens a device over 128,256 ids would be 16 GiB per float32 copy. Rows are made of whole
documents (config.data.packing='documents'): one of up to 64k tokens is never cut across rows.
Check what fits before renting: `python -m llm_jax.main --config=experiments/llama3_8b_long.py --dry_run
--target=v5p-8` (a heavy compile: minutes and GBs of host memory). On GPUs (no splash; the xla kernel inside the
context path) add --config.mesh.context_exchange=ring: 8 H100s then need 31.9 GiB per device, all_gather 410.5.
"""

import os

from llm_jax import config as config_lib


def get_config():
  c = config_lib.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'llama3_8b.py'))
  c.data.seq_len = 65536
  c.data.global_batch_size = 4
  c.data.packing = 'documents'  # a document of up to 64k tokens stays whole in one row (docs/data.md)
  c.train.grad_accum_steps = 2  # 2 sequences per device and microbatch on a v5p-8
  c.model.logits_chunks = 16  # 2,048 tokens a device and chunk on a v5p-8 (32,768 a microbatch)
  c.mesh.context = 4
  c.mesh.context_exchange = 'all_gather'
  c.mesh.context_load_balance = True
  c.mesh.fsdp = -1
  return c
