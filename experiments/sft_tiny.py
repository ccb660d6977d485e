"""Supervised fine-tuning of the tiny model (experiments/tiny.py), with LoRA, on instruction records made from the
embedded stdlib corpus (config.data.source=sft_stdlib: six lines of code as the user turn, the next three as the
answer; llm_jax/data/sft.py), so it runs as written with no data of your own:

    python -m llm_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny
    python -m llm_jax.main --config=experiments/sft_tiny.py --workdir=/tmp/sft_tiny --config.train.init_from=/tmp/tiny

Your own JSONL records ({"prompt", "response"} or {"messages": [...]}; template and loss mask: llm_jax/data/sft.py):
add --config.data.source=sft_jsonl --config.data.paths='my_data/*.jsonl'. The tokenizer is the init_from run's (set
config.data.tokenizer_path to use another). Set --config.lora.rank=0 for full fine-tuning.
"""

import os

from llm_jax import config as config_lib


def get_config():
  c = config_lib.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))  # same model as the pre-training preset, so init_from loads it
  c.data.source = 'sft_stdlib'
  c.data.max_docs = 4000  # records read (train + validation)
  c.data.validation_fraction = 0.05
  c.data.global_batch_size = 16
  c.data.sft_truncation = 'truncate'
  c.train.init_from = '/tmp/tiny'
  c.train.steps = 300
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.0
  c.eval.every = 100
  c.eval.steps = 4
  c.checkpoint.every = 100
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = 'q,k,v,o,gate,up,down'
  return c
