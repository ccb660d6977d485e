"""Helpers shared by tests/test_hf_families.py, test_hf_moe.py and test_hf_patterns.py: a tiny random transformers
model per case, imported once per module, logits from both sides (torch, CPU, float32), and the export check.

Each test file keeps its CASES: name -> (config class, model class, overrides of BASE, the config.model fields the
import must set, a negative control).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from llm_jax import checkpoint, convert, train  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-4
# What every case shares; a file's BASE changes what differs (test_hf_moe.py: a smaller FFN, top-2).
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build(cases, base, name, directory, random_norms=False):
  """cases[name] built on `base` with seed 0 and saved to directory: biases drawn at random (transformers
  initialises them to zero, which would test nothing) and, with random_norms, norm weights in [0.5, 1.5) (q/k norms
  at 1 would not show a wrong layout)."""
  config_cls, model_cls, overrides, _, _ = cases[name]
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**base, **overrides})).eval()
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if param_name.endswith('.bias'):
        param.normal_(0.0, 0.5)
      elif random_norms and param_name.endswith('norm.weight'):
        param.uniform_(0.5, 1.5)
  model.save_pretrained(directory)
  return model


def imported_fixture(cases, base, random_norms=False):
  """A module-scoped fixture `imported`: name -> (HF dir, transformers model, workdir, config, params), each case
  built (`build`) and imported (convert.from_hf, float32) once, on first use. In a test file:
  `imported = hf_compare.imported_fixture(CASES, BASE)`."""

  @pytest.fixture(scope='module')
  def imported(tmp_path_factory):
    cache = {}

    def get(name):
      if name not in cache:
        root = tmp_path_factory.mktemp(name.replace('.', '_'))
        hf_dir, workdir = str(root / 'hf'), str(root / 'work')
        model = build(cases, base, name, hf_dir, random_norms)
        config = convert.from_hf(hf_dir, workdir, dtype='float32')
        params, _ = checkpoint.load_params(workdir, train.abstract_params(config))
        cache[name] = (hf_dir, model, workdir, config, params)
      return cache[name]
    return get
  return imported


def tokens(seed=0, shape=(2, 40)):
  return np.random.default_rng(seed).integers(0, BASE['vocab_size'], shape)


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def our_logits(config, params, ids):
  return np.asarray(train.create_model(config).apply({'params': params}, jnp.asarray(ids)))


def check_export(hf_dir, workdir, out, model, tie_embeddings=False):
  """Exports an imported workdir to `out` and holds it to the HF directory it came from: the same tensors bit for
  bit, the source model's architecture, and transformers loading it gives the source model's logits (TOL)."""
  convert.to_hf(workdir, out)
  source, exported = load_file(os.path.join(hf_dir, 'model.safetensors')), load_file(os.path.join(out, 'model.safetensors'))
  if tie_embeddings:
    source.pop('lm_head.weight', None)  # some transformers versions save the shared copy
  assert sorted(source) == sorted(exported)
  for key, value in source.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['architectures'] == [model.__class__.__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = tokens(1)
  assert np.max(np.abs(hf_logits(reloaded, ids) - hf_logits(model, ids))) <= TOL


def check_logits(name, case, model, config, params):
  """The import set `case`'s config.model fields (CASES' fourth entry), and our logits equal transformers' within
  TOL. Returns the tokens and transformers' logits, for a file's negative controls."""
  for field, value in case[3].items():
    assert config.model[field] == value, field
  ids = tokens()
  expected = hf_logits(model, ids)
  diff = np.max(np.abs(our_logits(config, params, ids) - expected))
  print(f'{name}: max abs logits difference {diff:.2e}')
  assert diff <= TOL
  return ids, expected
