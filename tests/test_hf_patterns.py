"""Qwen3 (dense and MoE) against transformers: tiny random models (torch, CPU, float32) converted in and out.

What sets each family apart: an explicit head_dim wider than d_model / heads (64 wide, 4 heads of 32) and the
RMSNorm of each query and key head over head_dim (norm weights drawn at random so a wrong layout shows), for
Qwen3-MoE also its un-normalised top-2 of 4 experts. Logits at 40 tokens within 1e-4 (float32) with a negative
control that the per-head q/k norm matters; greedy generation token for token through our decoder
(llm_jax/decoding.py) and the serving engine against transformers' `generate`; `to_hf` of the import gives
identical tensors and transformers loads the export.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from safetensors.numpy import load_file  # noqa: E402

from llm_jax import config as config_lib, convert, decoding, train  # noqa: E402
from llm_jax.serving import Engine, EngineConfig, SamplingParams  # noqa: E402
import hf_compare  # noqa: E402
from hf_compare import TOL, hf_logits, our_logits, tokens  # noqa: E402

BASE = dict(hf_compare.BASE, head_dim=32)
# name -> (config class, model class, overrides, config.model fields the import must set, a negative control)
CASES = {
    'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', dict(tie_word_embeddings=True),
              dict(head_dim=32, qk_norm_per_head=True, qkv_bias=False, tie_embeddings=True),
              dict(qk_norm_per_head=False)),
    'qwen3_moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM',
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False),
                  dict(ffn='moe', num_experts=4, expert_ffn_dim=32, router_norm_topk=False, head_dim=32,
                       qk_norm_per_head=True),
                  dict(qk_norm_per_head=False)),
}


imported = hf_compare.imported_fixture(CASES, BASE, random_norms=True)


def _without_qk_norm(params):
  """The negative control's parameters: the q/k norm scales dropped (qk_norm_per_head=False has none)."""
  def strip(tree):
    if isinstance(tree, dict):
      return {k: strip(v) for k, v in tree.items() if k not in ('q_norm', 'k_norm')}
    return tree
  return strip(params)


@pytest.mark.parametrize('name', list(CASES))
def test_logits_match_transformers(imported, name):
  _, model, workdir, config, params = imported(name)
  for field, value in CASES[name][3].items():
    assert config.model[field] == value, field
  ids = tokens()
  expected = hf_logits(model, ids)
  diff = np.max(np.abs(our_logits(config, params, ids) - expected))
  print(f'{name}: max abs logits difference {diff:.2e}')
  assert diff <= TOL
  other = config_lib.load_workdir_config(workdir)
  other.model.update(CASES[name][4])
  other_params = _without_qk_norm(params) if not other.model.qk_norm_per_head else params
  assert np.max(np.abs(our_logits(other, other_params, ids) - expected)) > 1e-2, f'{CASES[name][4]} does not matter'


@pytest.mark.parametrize('name', list(CASES))
def test_round_trip_gives_identical_tensors_and_loads_in_transformers(imported, tmp_path, name):
  hf_dir, model, workdir, config, _ = imported(name)
  out = str(tmp_path / 'out')
  convert.to_hf(workdir, out)
  source, exported = load_file(os.path.join(hf_dir, 'model.safetensors')), load_file(os.path.join(out, 'model.safetensors'))
  if config.model.tie_embeddings:
    source.pop('lm_head.weight', None)  # some transformers versions save the shared copy
  assert sorted(source) == sorted(exported)
  for key, value in source.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['architectures'] == [model.__class__.__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = tokens(1)
  assert np.max(np.abs(hf_logits(reloaded, ids) - hf_logits(model, ids))) <= TOL


@pytest.mark.parametrize('name', list(CASES))
def test_greedy_generation_through_decoder_and_engine_matches_transformers(imported, name):
  """Prompts of 13 and 9 tokens, 12 new tokens: our KV-cache decoder (both rows at once, left-padded) and the
  serving engine (paged, chunked prefill) against transformers' `generate`."""
  _, model, _, config, params = imported(name)
  prompts = [tokens(5, (13,)).tolist(), tokens(6, (9,)).tolist()]
  cfg = train.create_model(config).cfg
  decoded = decoding.generate(cfg, params, prompts, 12)
  served = Engine(cfg, params, config=EngineConfig(page_size=4, max_seqs=2, max_chunk=8, max_prefill_tokens=16)
                  ).generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
  for prompt, ours, engine_out in zip(prompts, decoded, served):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    assert ours == expected
    assert engine_out.outputs[0].token_ids == expected


@pytest.mark.parametrize('name,edit,field', [
    ('qwen3_moe', {'decoder_sparse_step': 2}, 'decoder_sparse_step'),
    ('qwen3_moe', {'mlp_only_layers': [1]}, 'mlp_only_layers'),
    ('qwen3', {'attention_bias': True}, 'attention_bias'),
    ('qwen3', {'head_dim': 31}, 'head_dim'),
])
def test_unsupported_fields_are_refused_by_name(imported, tmp_path, name, edit, field):
  with open(os.path.join(imported(name)[0], 'config.json')) as f:
    hf = json.load(f)
  hf.update(edit)
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  with pytest.raises(convert.ConversionError, match=f'config.json: {field}'):
    convert.from_hf(str(tmp_path), str(tmp_path / 'work'))


@pytest.mark.parametrize('edit,field', [
    (dict(qk_norm=True, qk_norm_per_head=True), 'model.qk_norm_per_head'),
    (dict(head_dim=-1), 'model.head_dim'),
    (dict(head_dim=33), 'model.head_dim'),
    (dict(d_model=60, num_heads=8), 'model.num_heads'),
])
def test_config_refuses_bad_head_settings(edit, field):
  from llm_jax import validation
  config = config_lib.get_config()
  config.model.update(edit)
  with pytest.raises(config_lib.ConfigError, match=field):
    validation.validate(config, 1)
  if field == 'model.num_heads':  # the same shape is fine once the width is explicit
    config.model.head_dim = 16
    validation.validate(config, 1)
