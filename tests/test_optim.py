"""The learning-rate schedules against hand computation: warmup-stable-decay (schedule='wsd') in every shape."""

import math

import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import validation
from llm_jax import optim


def train_config(**overrides):
  c = config_lib.get_config()
  c.train.update(steps=100, learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule='wsd',
                 wsd_decay_fraction=0.2, wsd_decay_shape='linear')
  c.train.update(overrides)
  return c


def wsd_by_hand(step, steps=100, peak=1e-3, warmup=10, end_ratio=0.1, fraction=0.2, shape='linear'):
  """The schedule written out: the train step uses t = step + 1 when there is a warmup (step 0 gets peak/warmup)."""
  t = step + 1 if warmup else step
  decay = round(fraction * steps)
  start = steps - decay
  end = peak * end_ratio
  if t < warmup:
    return peak * t / warmup
  if t <= start:
    return peak
  p = min((t - start) / decay, 1.0)
  left = {'linear': 1 - p, 'cosine': 0.5 * (1 + math.cos(math.pi * p)), 'sqrt': 1 - math.sqrt(p)}[shape]
  return end + (peak - end) * left


@pytest.mark.parametrize('shape', ['linear', 'cosine', 'sqrt'])
@pytest.mark.parametrize('warmup', [0, 10])
def test_wsd_matches_the_hand_computation(shape, warmup):
  c = train_config(wsd_decay_shape=shape, warmup_steps=warmup)
  validation.validate(c, 1)
  schedule = optim.make_schedule(c.train)
  got = np.array([float(schedule(s)) for s in range(100)])
  want = np.array([wsd_by_hand(s, warmup=warmup, shape=shape) for s in range(100)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[50] == pytest.approx(1e-3)  # stable phase: the peak
  if warmup:
    assert got[0] == pytest.approx(1e-4) and got[-1] == pytest.approx(1e-4)  # peak/warmup ... min_lr_ratio*peak


def test_wsd_fields_are_validated():
  with pytest.raises(config_lib.ConfigError, match='train.wsd_decay_fraction'):
    validation.validate(train_config(wsd_decay_fraction=0.95), 1)
  with pytest.raises(config_lib.ConfigError, match='train.wsd_decay_shape'):
    validation.validate(train_config(wsd_decay_shape='exp'), 1)
  with pytest.raises(config_lib.ConfigError, match='train.z_loss'):
    validation.validate(train_config(z_loss=-1.0), 1)
