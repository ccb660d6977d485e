"""DPO on the tiny model (experiments/tiny.py) with pairs made from the embedded stdlib corpus: six lines of code
are the prompt, the next three the chosen completion, the same three lightly corrupted the rejected one (in
the first line two neighbouring words swapped; config.data.source=preference_stdlib, llm_jax/data/preference.py). The
reference is the init_from checkpoint. Each sequence (prompt + one completion) has up to dpo.max_length = 256
tokens, the model's max_seq_len (TRL's max_length per sequence), and a row of data.seq_len = 512 holds a pair or
more: 79 of the 3,903 pairs are truncated (at data.seq_len=128, one row a pair, 3,784 were).

    python -m llm_jax.main --config=experiments/tiny.py --workdir=/tmp/tiny --config.train.steps=200
    python -m llm_jax.main --config=experiments/dpo_tiny.py --workdir=/tmp/dpo_tiny --config.train.init_from=/tmp/tiny

The tokenizer is the init_from run's. Validation reward accuracy and margin (eval_rewards/accuracies,
eval_rewards/margins in metrics.jsonl) are the numbers to watch; docs/finetune.md reports a run.
"""

import os

from llm_jax import config as config_lib


def get_config():
  c = config_lib.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))  # same model, so init_from loads it
  c.model.objective = 'dpo'
  c.data.source = 'preference_stdlib'
  c.data.max_docs = 4000  # pairs read (train + validation)
  c.data.validation_fraction = 0.05
  c.data.seq_len = 512  # rows of pairs: positions restart for each sequence, so a row may exceed model.max_seq_len
  c.data.global_batch_size = 4  # about 5.5 pairs a step (1.4 a row)
  c.dpo.max_length = 256  # tokens of one sequence: model.max_seq_len
  c.dpo.beta = 0.1
  c.dpo.loss_type = 'sigmoid'
  c.train.init_from = '/tmp/tiny'
  c.train.steps = 150
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.0
  c.train.log_every = 10
  c.eval.every = 10
  c.eval.steps = 8
  c.checkpoint.every = 150
  return c
