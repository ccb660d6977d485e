"""config.train.init_from from any of our workdirs (train._initial_params): a plain run, a LoRA run (adapters merged
into the weights, or kept as the start of a LoRA continuation: config.train.init_from_adapters), and one error naming
the leaves when a checkpoint's tree does not fit, never "no intact checkpoint" (checkpoint.load_params).

The sources are written directly (convert.write_workdir, as training saves them: params plus meta with the model and
LoRA fields), so no test here trains; the runs that train through these paths are in tests/test_doc_commands.py.
The merge is compared with W + A.B.alpha/rank computed in numpy float64 (float32 result: within 1e-6 relative).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import checkpoint, convert, objectives, train, validation
from llm_jax.config import ConfigError
from llm_jax.model import lora
import helpers

RANK, ALPHA = 4, 8.0


def config(rank=0, init_from='', adapters='merge', alpha=ALPHA, targets='q,k,v,o,gate,up,down', objective='clm'):
  c = helpers.tiny_config(lora=dict(rank=rank, alpha=alpha, targets=targets),
                          train=dict(init_from=init_from, init_from_adapters=adapters))
  if objective == 'dpo':
    c.model.objective = 'dpo'
    c.data.source = 'preference_jsonl'
  return c


def random_params(c, seed):
  """Parameters of `c` with every leaf random (non-zero lora_b, so a merge is not the base itself)."""
  params = nn.unbox(train.init_params_fn(c, train.create_model(c))(jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), params)


def write(c, params, workdir, meta_lora=True):
  meta = dict(model=c.model.to_dict())
  if meta_lora:  # as train._meta records it
    meta['lora'] = c.lora.to_dict()
  convert.write_workdir(c, params, workdir, meta)
  return workdir


@pytest.fixture(scope='module')
def lora_source(tmp_path_factory):
  c = config(rank=RANK)
  params = random_params(c, 1)
  return write(c, params, str(tmp_path_factory.mktemp('lora') / 'run')), params


def initial(c, tmp_path):
  trainer = train.Trainer(c, str(tmp_path / 'run'), jax.devices()[:1])
  return trainer, jax.device_get(train._initial_params(trainer))  # pylint: disable=protected-access


def merged_f64(params, scale):
  """W + A.B * scale per adapted kernel, in numpy float64 (an independent computation of lora.merge)."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict) and 'lora_a' in value:
      a, b, w = (np.asarray(value[k], np.float64) for k in ('lora_a', 'lora_b', 'kernel'))
      rank = a.shape[-1]
      lead = a.ndim + b.ndim - 2 - w.ndim  # stacked layers: 1, else 0 (A [lead, in..., r], B [lead, r, out...])
      flat_a = a.reshape(*a.shape[:lead], -1, rank)
      flat_b = b.reshape(*b.shape[:lead], rank, -1)
      out[key] = dict(kernel=w + np.matmul(flat_a, flat_b).reshape(w.shape) * scale)
    elif isinstance(value, dict):
      out[key] = merged_f64(value, scale)
    else:
      out[key] = np.asarray(value, np.float64)
  return out


def test_merge_into_a_full_run_is_w_plus_ab_times_alpha_over_rank(lora_source, tmp_path):
  source, params = lora_source
  _, got = initial(config(rank=0, init_from=source), tmp_path)
  assert not lora.has_adapters(got)
  expected = merged_f64(params, ALPHA / RANK)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6), got, expected)
  # the adapters changed the weights: a merge that dropped them would fail here
  q = params['layers']['attn']['q']
  assert np.abs(got['layers']['attn']['q']['kernel'] - q['kernel']).max() > 1e-2


def test_merge_into_a_lora_run_gives_the_merged_base_and_fresh_adapters(lora_source, tmp_path):
  source, params = lora_source
  trainer, got = initial(config(rank=2, alpha=4.0, targets='q,v', init_from=source), tmp_path)
  base, adapters = lora.split(got)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6), base,
               merged_f64(params, ALPHA / RANK))
  fresh = jax.device_get(lora.split(trainer.fresh_state().params)[1])
  assert jax.tree.structure(adapters) == jax.tree.structure(fresh)
  jax.tree.map(np.testing.assert_array_equal, adapters, fresh)
  assert all(not np.any(b['lora_b']) for b in (adapters['layers']['attn']['q'], adapters['layers']['attn']['v']))


def test_keep_continues_the_sources_adapters_bit_for_bit(lora_source, tmp_path):
  source, params = lora_source
  _, got = initial(config(rank=RANK, init_from=source, adapters='keep'), tmp_path)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, got, params)


@pytest.mark.parametrize('field, value', [('rank', 8), ('alpha', 4.0), ('targets', 'q,k,v,o')])
def test_keep_with_other_lora_settings_names_the_field(lora_source, tmp_path, field, value):
  source, _ = lora_source
  c = config(rank=RANK, init_from=source, adapters='keep')
  c.lora[field] = value
  with pytest.raises(train.IncompatibleCheckpointError, match=rf'^config\.train\.init_from_adapters=keep: '
                     rf'config\.lora\.{field}='):
    initial(c, tmp_path)


def test_keep_needs_a_lora_run():
  with pytest.raises(ConfigError, match=r'^config\.train\.init_from_adapters: keep .* lora\.rank > 0'):
    validation.validate(config(rank=0, adapters='keep'), 1)


def test_dpo_reference_is_the_start_with_kept_adapters_and_the_base_without():
  """A LoRA DPO run's reference is its starting point: the base alone when the adapters start fresh (no copy), a
  copy of base + adapters when init_from's adapters are kept (the base alone would be another model)."""
  assert objectives.make(config(rank=RANK, objective='dpo')).reference_kind() == 'lora_base'
  assert objectives.make(config(rank=RANK, adapters='keep', objective='dpo')).reference_kind() == 'copy'
  assert objectives.make(config(rank=0, objective='dpo')).reference_kind() == 'copy'


def test_a_tree_that_does_not_fit_is_one_error_naming_the_leaves(tmp_path):
  """A checkpoint with adapters whose meta and config.json say rank 0 (so nothing tells init_from to expect them):
  one error naming the extra leaves, not 'no intact checkpoint', and the step is not taken for damage."""
  c = config(rank=RANK)
  params = random_params(c, 2)
  source = write(config(rank=0), params, str(tmp_path / 'odd'))
  with pytest.raises(train.IncompatibleCheckpointError) as raised:
    initial(config(rank=0, init_from=source), tmp_path)
  message = str(raised.value)
  assert message.startswith('config.train.init_from: ') and 'intact but its params differ' in message, message
  assert 'in the checkpoint but not wanted: layers/attn/k/lora_a' in message, message
  assert 'no intact' not in message and '\n' not in message


def test_other_shapes_are_named_with_both_shapes(lora_source):
  source, _ = lora_source
  like = train.abstract_params(config(rank=8))
  with pytest.raises(checkpoint.StructureMismatchError) as raised:
    checkpoint.load_params(source, like)
  message = str(raised.value)
  assert '14 of other shapes: layers/attn/k/lora_a (2, 32, 4) stored, (2, 32, 8) wanted' in message, message
  assert 'missing' not in message and 'no intact' not in message


def test_tree_differences_lists_missing_extra_and_reshaped():
  stored = {'a': (2,), 'b': (3,), 'c': (4,)}
  wanted = {'a': (2,), 'b': (5,), 'd': (1,)}
  assert checkpoint.tree_differences(stored, wanted) == (
      '1 missing from the checkpoint: d; 1 in the checkpoint but not wanted: c; 1 of other shapes: b (3,) stored, '
      '(5,) wanted')
  assert checkpoint.tree_differences(stored, stored) == ''
  many = {f'x{i}': (1,) for i in range(6)}
  assert checkpoint.tree_differences({}, many, limit=2) == '6 missing from the checkpoint: x0, x1 (and 4 more)'
  assert not checkpoint.is_damage(ValueError('User-provided restore item and on-disk value metadata tree '
                                             'structures do not match: ...'))
  assert checkpoint.is_damage(ValueError('unreadable array'))
