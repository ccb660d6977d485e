"""Mixtral, Qwen2-MoE and OLMoE against transformers: tiny random models (torch, CPU, float32) converted in and out.

Each family with what sets it apart: Mixtral's renormalised top-2 of 4 experts and a sliding window (8), Qwen2-MoE's
un-normalised top-2 (norm_topk_prob false), q/k/v biases drawn at random and the sigmoid-gated shared expert,
OLMoE's q/k RMSNorm over all heads and top-2 of 8 experts. Logits at 40 tokens within 1e-4 (float32), a negative
control that the family's router normalisation matters, round-trip tensors identical, the export loaded by
AutoModelForCausalLM, and greedy KV-cache generation token for token against transformers' `generate`.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from llm_jax import config as config_lib, convert, decoding, train  # noqa: E402
import hf_compare  # noqa: E402
from hf_compare import check_export, check_logits, our_logits, tokens  # noqa: E402

BASE = dict(hf_compare.BASE, intermediate_size=48, num_experts_per_tok=2)
# name -> (config class, model class, overrides, config.model fields the import must set, a negative control)
CASES = {
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM', dict(num_local_experts=4, sliding_window=8),
                dict(ffn='moe', num_experts=4, expert_ffn_dim=48, router_norm_topk=True, sliding_window=8),
                dict(router_norm_topk=False)),
    'qwen2_moe': ('Qwen2MoeConfig', 'Qwen2MoeForCausalLM',
                  dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                       norm_topk_prob=False),
                  dict(ffn='moe', num_experts=4, expert_ffn_dim=32, shared_expert_ffn_dim=40, router_norm_topk=False,
                       qkv_bias=True),
                  dict(router_norm_topk=True)),
    'olmoe': ('OlmoeConfig', 'OlmoeForCausalLM', dict(num_experts=8, norm_topk_prob=False),
              dict(ffn='moe', num_experts=8, expert_ffn_dim=48, router_norm_topk=False, qk_norm=True),
              dict(router_norm_topk=True)),
}


imported = hf_compare.imported_fixture(CASES, BASE, random_norms=True)


@pytest.mark.parametrize('name', list(CASES))
def test_logits_match_transformers(imported, name):
  _, model, workdir, config, params = imported(name)
  ids, expected = check_logits(name, CASES[name], model, config, params)
  other = config_lib.load_workdir_config(workdir)
  other.model.update(CASES[name][4])
  assert np.max(np.abs(our_logits(other, params, ids) - expected)) > 1e-2, f'{CASES[name][4]} does not matter here'


@pytest.mark.slow
@pytest.mark.parametrize('name', list(CASES))
def test_round_trip_gives_identical_tensors_and_loads_in_transformers(imported, tmp_path, name):
  hf_dir, model, workdir, _, _ = imported(name)
  check_export(hf_dir, workdir, str(tmp_path / 'out'), model)


@pytest.mark.slow
@pytest.mark.parametrize('name', list(CASES))
def test_greedy_generation_matches_transformers(imported, name):
  """KV-cache decoding from prompts of 13 and 9 tokens (left-padded together) for 16 tokens."""
  _, model, _, config, params = imported(name)
  prompts = [tokens(5, (13,)).tolist(), tokens(6, (9,)).tolist()]
  ours = decoding.generate(train.create_model(config).cfg, params, prompts, 16)
  for prompt, row in zip(prompts, ours):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert row == out[0, len(prompt):].tolist()


@pytest.mark.parametrize('name,edit,field', [
    ('qwen2_moe', {'decoder_sparse_step': 2}, 'decoder_sparse_step'),
    ('qwen2_moe', {'mlp_only_layers': [1]}, 'mlp_only_layers'),
    ('olmoe', {'clip_qkv': 8.0}, 'clip_qkv'),
])
def test_unsupported_fields_are_refused_by_name(imported, tmp_path, name, edit, field):
  with open(os.path.join(imported(name)[0], 'config.json')) as f:
    hf = json.load(f)
  hf.update(edit)
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  with pytest.raises(convert.ConversionError, match=f'config.json: {field}'):
    convert.from_hf(str(tmp_path), str(tmp_path / 'work'))


def test_dense_families_do_not_express_a_mixture_of_experts(imported):
  from llm_jax import families
  config = imported('mixtral')[3]
  assert families.export_family(config.model).model_type == 'mixtral'
  config.model.ffn = 'dense'
  assert families.export_family(config.model).model_type == 'mistral'
