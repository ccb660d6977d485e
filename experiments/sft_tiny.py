"""Supervised fine-tuning of the tiny model (experiments/tiny.py) on JSONL instruction records, with LoRA.

    python -m llm_jax.main --config=experiments/sft_tiny.py --workdir=/tmp/sft_tiny \
        --config.train.init_from=/tmp/tiny --config.data.paths='my_data/*.jsonl'

Records are {"prompt", "response"} or {"messages": [...]} (template and loss mask: llm_jax/data/sft.py). The
tokenizer is the init_from run's (set config.data.tokenizer_path to use another). Set --config.lora.rank=0 for
full fine-tuning.
"""

import os

from llm_jax import config as config_lib

from llm_jax import config as base  # pylint: disable=unused-import


def get_config():
  c = config_lib.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))  # same model as the pre-training preset, so init_from loads it
  c.data.source = 'sft_jsonl'
  c.data.paths = ''  # set on the command line
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
