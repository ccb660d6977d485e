"""tiny (experiments/tiny.py) with a mixture of experts in place of its SwiGLU: 8 experts of width 192, 2 per token,
so that a token multiplies the same FFN weights as tiny's one FFN of 384 (plus a 128x8 router per layer), while the
model stores 4x the FFN parameters. Same corpus, steps and schedule as tiny: the comparison of docs/moe.md.

    python -m llm_jax.main --config=experiments/moe_tiny.py --workdir=/tmp/moe_tiny
"""

import os

from llm_jax import config as config_lib


def get_config():
  c = config_lib.load_experiment(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))
  c.model.ffn = 'moe'
  c.model.num_experts = 8
  c.model.experts_per_token = 2
  c.model.expert_ffn_dim = 192  # 2 x 192 = tiny's ffn_dim of 384: equal active FFN parameters per token
  c.model.router_aux_loss_coef = 0.01
  c.model.router_z_loss_coef = 1e-3
  return c
