"""Every shipped preset loads and validates; each inconsistent config is rejected naming its field."""

import glob
import os

import pytest

from llm_jax import config as config_lib
from llm_jax import validation

EXPERIMENTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'experiments', '*.py')))


@pytest.mark.parametrize('path', EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_loads_and_validates(path):
  config = config_lib.load_experiment(path)
  devices = config.data.global_batch_size  # any count the batch divides works with mesh.data = -1
  validation.validate(config, devices)


def test_presets_required_by_other_parts_exist():
  names = {os.path.basename(p)[:-3] for p in EXPERIMENTS}
  assert {'tiny', '125m', '1b', '7b'} <= names
  big = config_lib.load_experiment('7b').model
  assert (big.d_model, big.num_layers, big.num_heads, big.ffn_dim, big.vocab_size, big.max_seq_len) == (
      4096, 32, 32, 11008, 32000, 4096)
  one_b = config_lib.load_experiment('1b')
  assert (one_b.model.d_model, one_b.model.num_layers, one_b.model.num_heads, one_b.model.ffn_dim,
          one_b.data.seq_len) == (2048, 16, 16, 5632, 2048)


def _base():
  c = config_lib.get_config()
  c.data.global_batch_size = 8
  return c


BAD = [
    ('model.num_heads', lambda c: c.model.update(num_heads=7)),
    ('model.num_kv_heads', lambda c: c.model.update(num_kv_heads=3)),
    ('model.attention', lambda c: c.model.update(attention='flash3')),
    ('model.remat', lambda c: c.model.update(remat='everything')),
    ('model.dtype', lambda c: c.model.update(dtype='float8')),
    ('model.objective', lambda c: c.model.update(objective='seq2seq')),
    ('model.d_model', lambda c: c.model.update(d_model=0)),
    ('data.source', lambda c: c.data.update(source='s3')),
    ('data.seq_len', lambda c: c.data.update(seq_len=4096)),  # > max_seq_len 2048
    ('data.global_batch_size', lambda c: c.data.update(global_batch_size=6)),  # 8 devices on data
    ('data.global_batch_size', lambda c: c.train.update(grad_accum_steps=3)),
    ('train.schedule', lambda c: c.train.update(schedule='step')),
    ('train.moments_dtype', lambda c: c.train.update(moments_dtype='int8')),
    ('train.steps', lambda c: c.train.update(steps=0)),
    ('mesh', lambda c: c.mesh.update(data=2, fsdp=2, tensor=1)),  # product 4 != 8 devices
    ('mesh.fsdp', lambda c: c.mesh.update(data=-1, fsdp=-1)),
    ('mesh.data', lambda c: c.mesh.update(data=-1, fsdp=3)),
    ('mesh.rules', lambda c: c.mesh.update(rules=(('embed', 'model'), ('vocab', None), ('act_batch', 'data')))),
    ('lora.targets', lambda c: c.lora.update(rank=4, targets='q,wq')),
    ('model.num_kv_heads', lambda c: c.update_from_flattened_dict({'model.num_kv_heads': 2, 'mesh.data': 2,
                                                                   'mesh.tensor': 4})),  # 2 kv heads over 4
    ('model.vocab_size', lambda c: c.update_from_flattened_dict({'model.vocab_size': 32001, 'mesh.data': 4,
                                                                 'mesh.tensor': 2})),
    ('model.d_model', lambda c: c.update_from_flattened_dict({'model.d_model': 12, 'model.num_heads': 2,
                                                              'model.num_kv_heads': 2, 'mesh.data': 1,
                                                              'mesh.fsdp': 8})),  # 12 over 8 fsdp shards
    ('eval.steps', lambda c: c.eval.update(steps=0)),
    ('checkpoint.every', lambda c: c.checkpoint.update(every=-1)),
    ('eval.task_file', lambda c: c.eval.update(task_file='/no/such/tasks.jsonl')),
]


@pytest.mark.parametrize('field,break_it', BAD, ids=[f'{f}-{i}' for i, (f, _) in enumerate(BAD)])
def test_bad_config_is_rejected_naming_the_field(field, break_it):
  config = _base()
  break_it(config)
  with pytest.raises(config_lib.ConfigError, match=rf'^config\.{field}[: ]'):
    validation.validate(config, num_devices=8)


def test_locked_config_rejects_unknown_field():
  config = _base()
  config.lock()
  with pytest.raises(AttributeError):
    config.model.num_layer = 3  # typo of num_layers


def test_mesh_minus_one_takes_remaining_devices():
  config = _base()
  config.mesh.update(data=-1, fsdp=2, tensor=2)
  assert validation.validate(config, 8) == {'data': 2, 'expert': 1, 'fsdp': 2, 'context': 1, 'tensor': 2}
