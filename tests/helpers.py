"""Helpers shared by the test files: the tiny training config most of them start from.

A plain module rather than a conftest fixture: tests call tiny_config inside their own helpers and module-scoped
fixtures, and the subprocess tests import it (`sys.path.insert(0, <tests>)`, then `from helpers import
tiny_config`). It imports nothing from the tests and no jax, so a child process stays as light as its test needs.
"""

import os

import numpy as np

from llm_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**sections):
  """A 2-layer float32 model (vocab 64, width 32) on the synthetic source: 5 steps of 8 sequences of 16 tokens,
  a train row every step, no evaluation or checkpoint before the end. Each keyword is a config section and a dict
  of its fields to change: tiny_config(train=dict(steps=10), mesh=dict(data=1, fsdp=8))."""
  c = config_lib.get_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, max_seq_len=32,
                 dtype='float32', attention='xla')
  c.data.update(source='synthetic', seq_len=16, global_batch_size=8)
  c.train.update(steps=5, learning_rate=1e-2, warmup_steps=2, log_every=1)
  c.eval.update(every=0, steps=2)
  c.checkpoint.update(every=0, keep=3)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  for section, values in sections.items():
    c[section].update(values)
  return c


def tiny_config_with(**defaults):
  """tiny_config for a test file whose runs differ from it: `defaults` (sections, as tiny_config takes them) first,
  then what the call passes, field by field: tiny_config_with(train=dict(steps=4))(train=dict(log_every=2)) has
  both. A call's section updates the file's, it does not replace it."""

  def config(**sections):
    merged = {name: dict(values) for name, values in defaults.items()}
    for name, values in sections.items():
      merged[name] = {**merged.get(name, {}), **values}
    return tiny_config(**merged)
  return config


def packed_segments(rng, batch, length, max_padding):
  """Segment ids [batch, length] of rows holding 1-4 documents of random lengths, half of them ending in 1 to
  max_padding - 1 positions of padding (segment 0): packed rows for attention tests."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(0, 4), replace=False))
    row = np.zeros(length, np.int32)
    for i, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, length])):
      row[a:b] = i + 1
    if rng.random() < 0.5:
      row[length - rng.integers(1, max_padding):] = 0
    rows.append(row)
  return np.stack(rows)
