"""A tiny masked-LM (BERT-style) model on the embedded stdlib corpus: the tiny preset with objective='mlm'.

    python -m llm_jax.main --config=experiments/mlm_tiny.py --workdir=/tmp/mlm_tiny

Same blocks and loop as causal pre-training; only the objective differs: bidirectional attention within each
document, 15% of tokens selected (80% -> [MASK] = id 2, the tokenizer's reserved BOS; 10% random; 10% kept),
loss and eval_accuracy on the selected positions (llm_jax/objectives.py). Only 15% of the tokens are targets,
so it needs more steps than the causal preset for the same loss drop.
"""

import os

from llm_jax import config as config_lib


def get_config():
  c = config_lib.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))
  c.model.objective = 'mlm'
  c.model.mask_token_id = 2
  c.data.mask_prob = 0.15
  c.data.global_batch_size = 32
  c.train.steps = 1500
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 100
  c.eval.every = 500
  c.checkpoint.every = 500
  return c
