"""GRPO from scratch on a verifiable toy task, on a CPU in about a minute (docs/rl.md shows a run):

    python -m llm_jax.main --config=experiments/grpo_tiny.py --workdir=/tmp/grpo_tiny

Each prompt names a letter ("write the letter a", with a few other words around it); the reward (`letter_share`,
below, loaded as the user reward experiments/grpo_tiny.py:letter_share) is the share of the completion's letters
that are that letter, so a completion of only that letter scores 1. A randomly initialised model scores near 0 and
learns from its own samples, through the engine on the parameters being trained, to write the asked letter.

The prompts and a small SentencePiece tokenizer are made by this file (deterministically, in
<tmp>/llm_jax_grpo_tiny/, once), so the preset needs no download and no earlier run.
"""

import json
import os
import random
import tempfile

from llm_jax import config as config_lib

LETTERS = 'ab'
FILLERS = ('please', 'now', 'kindly', 'just', 'only')


def letter_share(prompts, completions, letter, **fields):
  """The share of each completion's letters that are the record's letter (0 for a completion without letters)."""
  out = []
  for completion, target in zip(completions, letter):
    letters = [ch for ch in completion if ch.isalpha()]
    out.append(sum(ch == target for ch in letters) / len(letters) if letters else 0.0)
  return out


def files(directory: str | None = None) -> tuple[str, str]:
  """(prompts.jsonl, tokenizer.model) of the task, written once."""
  directory = directory or os.path.join(tempfile.gettempdir(), 'llm_jax_grpo_tiny')
  os.makedirs(directory, exist_ok=True)
  prompts, model = os.path.join(directory, 'prompts.jsonl'), os.path.join(directory, 'tokenizer.model')
  if not os.path.exists(prompts):
    rng = random.Random(0)
    records = []
    for i in range(400):
      letter = LETTERS[i % len(LETTERS)]
      words = [rng.choice(FILLERS), 'write', 'the', 'letter', letter]
      records.append(dict(prompt=' '.join(words) + ' :', letter=letter))
    with open(prompts + '.tmp', 'w') as f:
      f.write(''.join(json.dumps(r) + '\n' for r in records))
    os.replace(prompts + '.tmp', prompts)
  if not os.path.exists(model):
    from llm_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
    lines = [' '.join(FILLERS), 'write the letter :'] + [' '.join(c * n for n in range(1, 6)) for c in LETTERS]
    with open(model + '.tmp', 'wb') as f:
      f.write(tokenizer.train(lines * 50, 300))
    os.replace(model + '.tmp', model)
  return prompts, model


def get_config():
  c = config_lib.get_config()
  prompts, tokenizer_model = files()
  c.model.update(vocab_size=320, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=192,
                 max_seq_len=64, dtype='float32', objective='grpo')
  c.data.update(source='prompts_jsonl', paths=prompts, tokenizer_path=tokenizer_model, seq_len=32,
                global_batch_size=32, validation_fraction=0.05)
  c.grpo.update(group_size=8, prompts_per_rollout=4, max_completion_tokens=8, temperature=1.0,
                loss_type='dapo', rewards=f'{os.path.abspath(__file__)}:letter_share', log_samples_every=10,
                eval_prompts=16)
  c.train.update(steps=100, learning_rate=1e-2, warmup_steps=5, weight_decay=0.0, log_every=5, schedule='constant')
  c.eval.update(every=25)
  c.checkpoint.update(every=50, keep=1)
  return c
