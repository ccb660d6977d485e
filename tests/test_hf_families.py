"""Llama 3.x, Qwen2/2.5 and Mistral against transformers: tiny random models with the features that set them apart.

Each case is built with transformers (torch, CPU, float32) with odd shapes: GQA, tied embeddings, RoPE scaling
(linear, llama3, yarn) with a short original context (16) so that scaling changes the function at the tested
lengths, q/k/v biases drawn at random (transformers initialises them to zero, which would test nothing), and a
sliding window (8) shorter than the sequences. Logits are compared at 40 tokens (past the window and the original
context) within 1e-4; a negative control checks that each feature matters at that length. Round trips compare
tensors exactly, and greedy KV-cache generation is compared with transformers' `generate` from a prompt longer than
the window.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from llm_jax import config as config_lib, convert, decoding, train  # noqa: E402
from llm_jax import validation  # noqa: E402
import hf_compare  # noqa: E402
from hf_compare import check_export, check_logits, our_logits, tokens  # noqa: E402

LLAMA3_ROPE = dict(rope_type='llama3', rope_theta=50000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
# name -> (config class, model class, overrides, the config.model fields the import must set, a field edit that
# must change the logits: the negative control showing the feature is exercised at the tested length)
CASES = {
    'llama3.2': ('LlamaConfig', 'LlamaForCausalLM', dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
                 dict(rope_scaling='llama3', rope_scaling_factor=4.0, rope_original_max_len=16, tie_embeddings=True),
                 dict(rope_scaling='none')),
    'llama_linear': ('LlamaConfig', 'LlamaForCausalLM',
                     dict(rope_parameters=dict(rope_type='linear', rope_theta=10000.0, factor=2.0)),
                     dict(rope_scaling='linear', rope_scaling_factor=2.0), dict(rope_scaling='none')),
    'qwen2.5': ('Qwen2Config', 'Qwen2ForCausalLM', dict(tie_word_embeddings=True),
                dict(qkv_bias=True, sliding_window=0, tie_embeddings=True), None),
    'qwen2_window': ('Qwen2Config', 'Qwen2ForCausalLM',
                     dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
                     dict(qkv_bias=True, sliding_window=8), dict(sliding_window=0)),
    'qwen2_yarn': ('Qwen2Config', 'Qwen2ForCausalLM',
                   dict(rope_parameters=dict(rope_type='yarn', rope_theta=10000.0, factor=4.0, beta_fast=8.0,
                                             original_max_position_embeddings=16)),
                   dict(rope_scaling='yarn', rope_scaling_factor=4.0, rope_original_max_len=16,
                        rope_yarn_beta_fast=8.0), dict(rope_scaling='none')),
    'mistral': ('MistralConfig', 'MistralForCausalLM', dict(sliding_window=8),
                dict(sliding_window=8, qkv_bias=False), dict(sliding_window=0)),
}


imported = hf_compare.imported_fixture(CASES, hf_compare.BASE)


@pytest.mark.parametrize('name', list(CASES))
def test_logits_match_transformers(imported, name):
  _, model, _, config, params = imported(name)
  ids, expected = check_logits(name, CASES[name], model, config, params)
  control = CASES[name][4]
  if control:
    other = config_lib.load_workdir_config(imported(name)[2])
    other.model.update(control)
    assert np.max(np.abs(our_logits(other, params, ids) - expected)) > 1e-2, f'{control} does not matter here'


@pytest.mark.parametrize('name', ['llama3.2', 'qwen2.5', 'mistral', 'qwen2_yarn'])
def test_round_trip_gives_identical_tensors(imported, tmp_path, name):
  hf_dir, model, workdir, config, _ = imported(name)
  check_export(hf_dir, workdir, str(tmp_path / 'out'), model, config.model.tie_embeddings)


@pytest.mark.parametrize('name', ['mistral', 'llama3.2', 'qwen2_window'])
def test_greedy_generation_matches_transformers(imported, name):
  """KV-cache decoding from a 13-token prompt (longer than the window of 8) for 24 tokens (past the original
  context of 16)."""
  _, model, _, config, params = imported(name)
  prompts = [tokens(5, (13,)).tolist(), tokens(6, (9,)).tolist()]
  cfg = train.create_model(config).cfg
  ours = decoding.generate(cfg, params, prompts, 24)  # both rows at once: left padding must not shift the window
  for prompt, row in zip(prompts, ours):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert row == out[0, len(prompt):].tolist()


def test_packed_documents_keep_their_own_window(imported):
  """Two documents packed in one row give each the logits it has alone (window counted within the document)."""
  _, _, _, config, params = imported('mistral')
  first, second = tokens(7, (1, 20)), tokens(8, (1, 20))
  packed = np.concatenate([first, second], axis=1)
  segments = np.concatenate([np.ones((1, 20)), 2 * np.ones((1, 20))], axis=1).astype(np.int32)
  positions = np.concatenate([np.arange(20), np.arange(20)])[None]
  model = train.create_model(config)
  out = np.asarray(model.apply({'params': params}, packed, segments, positions))
  np.testing.assert_allclose(out[:, 20:], our_logits(config, params, second), atol=1e-5)
  np.testing.assert_allclose(out[:, :20], our_logits(config, params, first), atol=1e-5)


@pytest.mark.parametrize('edit, field', [
    ({'rope_parameters': {'rope_type': 'longrope', 'rope_theta': 1e4, 'factor': 4.0}}, "rope_parameters: rope scaling "
     "of type 'longrope'"),
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}},
     'rope_parameters.original_max_position_embeddings: missing'),
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0, 'truncate': False,
                          'original_max_position_embeddings': 16}}, 'rope_parameters.truncate'),
    ({'rope_scaling': {'type': 'dynamic', 'factor': 2.0}, 'rope_parameters': None}, "rope_scaling: rope scaling of "
     "type 'dynamic'"),
    ({'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 1e4, 'factor': 8.0}},
     'rope_parameters.low_freq_factor: missing'),
    ({'model_type': 'gemma'}, 'model_type'),
    ({'architectures': ['MistralForCausalLM']}, 'architectures'),
])
def test_unsupported_fields_are_refused_by_name(imported, tmp_path, edit, field):
  with open(os.path.join(imported('qwen2.5')[0], 'config.json')) as f:
    hf = json.load(f)
  hf.update(edit)
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  with pytest.raises(convert.ConversionError, match=f'config.json: {field}'):
    convert.from_hf(str(tmp_path), str(tmp_path / 'work'))


def test_config_refuses_bad_values():
  config = config_lib.get_config()
  config.model.rope_scaling = 'longrope'
  with pytest.raises(config_lib.ConfigError, match='model.rope_scaling'):
    validation.validate(config, 1)
  config = config_lib.get_config()
  config.model.update(rope_scaling='yarn', rope_scaling_factor=4.0, rope_yarn_beta_slow=32.0)
  with pytest.raises(config_lib.ConfigError, match='model.rope_yarn_beta_fast: yarn needs 0 < rope_yarn_beta_slow'):
    validation.validate(config, 1)
  config = config_lib.get_config()
  config.model.sliding_window = -1
  with pytest.raises(config_lib.ConfigError, match='model.sliding_window'):
    validation.validate(config, 1)


@pytest.mark.parametrize('causal', [True, False])
def test_window_in_every_kernel_matches_the_dense_mask(causal):
  """cuDNN's arguments (local_window_size) run through jax's own implementation on CPU, and splash's LocalMask
  evaluated as an array, against MaskInfo.dense with packed segments (the xla kernel's mask)."""
  from llm_jax.model import attention
  t, window = 24, 5
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32) for _ in range(3))
  k, v = k[:, :, :2], v[:, :, :2]  # GQA
  segments = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], 2, axis=0), jnp.int32)
  info = attention.MaskInfo(segments, segments, causal, window=window)
  expected = attention.xla_attention(q, k, v, info)
  for max_segments in (0, 8):  # the dense path, and segment_dispatch (which must not take a windowless path)
    got = attention.cudnn_attention(q, k, v, dataclasses.replace(info, max_segments=max_segments),
                                    implementation='xla')
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
  one = jnp.ones_like(segments)  # one document per row: the plain causal call with the window
  one_info = attention.MaskInfo(one, one, causal, max_segments=8, window=window)
  np.testing.assert_allclose(np.asarray(attention.cudnn_attention(q, k, v, one_info, implementation='xla')),
                             np.asarray(attention.xla_attention(q, k, v, one_info)), atol=1e-5)
  full = attention.xla_attention(q, k, v, attention.MaskInfo(segments, segments, causal))
  assert np.max(np.abs(np.asarray(full) - np.asarray(expected))) > 1e-2  # the window matters here
  sm = pytest.importorskip('jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_mask')
  local = sm.LocalMask((t, t), window_size=info.window_sides(), offset=0)[:, :]
  same_segment = np.asarray(segments[0, :, None] == segments[0, None, :])
  np.testing.assert_array_equal(local & same_segment, np.asarray(info.dense()[0]))


@pytest.mark.parametrize('preset, hf_count', [('llama3_8b', 8_030_261_248), ('llama3_2_1b', 1_235_814_400)])
def test_llama3_presets_have_the_released_shapes(preset, hf_count):
  """Parameter counts without allocating: ours (eval_shape), the FLOPs formula's, and transformers' model built
  from the exported config.json on the meta device (nothing allocated either)."""
  import flax.linen as nn
  from llm_jax import metrics
  config = config_lib.load_experiment(preset)
  validation.validate(config, 8)
  shapes = jax.eval_shape(lambda r: nn.unbox(train.create_model(config).init(r, jnp.zeros((1, 8), jnp.int32))),
                          jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert count == metrics.total_params(config.model) == hf_count
  hf = convert.hf_config_from_model(config.model, 'bfloat16', {})
  with torch.device('meta'):
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
  assert model.num_parameters() == hf_count
  assert model.config.rope_parameters['rope_type'] == 'llama3'


def test_imported_preset_is_the_workdir_config(imported):
  """experiments/imported.py:W (what docs/finetune.md runs from) gives the imported model's fields."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'imported.py')
  spec = importlib.util.spec_from_file_location('imported_preset', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  workdir = imported('mistral')[2]
  config = module.get_config(workdir)
  assert (config.model.sliding_window, config.model.qkv_bias, config.model.vocab_size) == (8, False, 128)
  assert module.get_config().model.sliding_window == 0


@pytest.mark.parametrize('extra', [dict(), dict(mscale=1.0, mscale_all_dim=0.8),
                                   dict(beta_fast=16.0, beta_slow=2.0, attention_factor=1.3)], ids=str)
def test_yarn_frequencies_and_attention_factor_match_transformers(extra):
  """Our YaRN (model/layers.py Rope) from an HF rope config, against transformers' own yarn init: the inverse
  frequencies (float32, rtol 1e-6) and the factor on cos and sin, with DeepSeek's mscale pair and explicit values."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from llm_jax.families import base
  from llm_jax.model.layers import Rope
  params = dict(rope_type='yarn', rope_theta=10000.0, factor=8.0, original_max_position_embeddings=64, **extra)
  hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=512,
                                rope_parameters=dict(params))
  want_freq, want_factor = ROPE_INIT_FUNCTIONS['yarn'](hf, 'cpu')
  rope, _ = base.rope_of({'rope_parameters': params})
  ours = Rope(theta=rope['rope_theta'], scaling='yarn', factor=rope['factor'],
              original_max_len=rope['original_max_position_embeddings'], beta_fast=rope.get('beta_fast', 32.0),
              beta_slow=rope.get('beta_slow', 1.0), attention_factor=rope.get('attention_factor', 0.0))
  np.testing.assert_allclose(ours.inv_freq(32), want_freq.numpy(), rtol=1e-6)
  np.testing.assert_allclose(ours.attention_scaling(), want_factor, rtol=1e-6)
