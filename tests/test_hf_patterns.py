"""Qwen3 (dense and MoE), Qwen2 and Qwen3 with windows on some layers, Gemma 2 and Gemma 3 against transformers:
tiny random models (torch, CPU, float32) converted in and out; and per-layer attention patterns and soft-capping
in the kernels.

What sets each family apart: an explicit head_dim (4 heads of 32 in 64: Gemma's query_pre_attn_scalar of 24 then
differs from it), the RMSNorm of each query and key head over head_dim (norm weights drawn at random so a wrong
layout shows), Qwen3-MoE's un-normalised top-2 of 4 experts, sliding windows (8) on some layers only, Gemma's
(1 + w) norms, sandwich norms, GeGLU, embedding scale and soft-caps low enough to bite (2 and 3), Gemma 3's RoPE per
layer kind (local base 100; global 10000 with linear scaling 4). Logits at 40 tokens (past the window) within 1e-4
(float32), with a negative control per quirk showing it matters there; greedy generation token for token through
our decoder (llm_jax/decoding.py) and the serving engine (paged, chunked prefill) against transformers' `generate`
from a 13-token prompt; `to_hf` of the import gives identical tensors and transformers loads the export.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from llm_jax import config as config_lib, convert, decoding, train  # noqa: E402
from llm_jax.serving import Engine, EngineConfig, SamplingParams  # noqa: E402
from llm_jax.serving.engine import unstack_layers  # noqa: E402
import hf_compare  # noqa: E402
from hf_compare import TOL, check_export, check_logits, hf_logits, our_logits, tokens  # noqa: E402

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
    # windows on some layers: Qwen2's max_window_layers (layers from 1 on), Qwen3's explicit layer_types over 5
    # layers (scanned: two repeats of the pattern and the fifth layer unrolled)
    'qwen2_partial': ('Qwen2Config', 'Qwen2ForCausalLM',
                      dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None),
                      dict(attention_pattern='global,sliding:8', sliding_window=0, qkv_bias=True),
                      dict(attention_pattern='global')),
    'qwen3_layer_types': ('Qwen3Config', 'Qwen3ForCausalLM',
                          dict(use_sliding_window=True, sliding_window=8, num_hidden_layers=5,
                               layer_types=['full_attention', 'sliding_attention'] * 2 + ['full_attention']),
                          dict(attention_pattern='global,sliding:8', sliding_window=0, qk_norm_per_head=True),
                          dict(attention_pattern='global')),
    # Gemma 2 over 3 layers: every quirk at a value where it changes the logits (a query scale other than
    # head_dim, soft-caps low enough to bite), each checked by its own negative control
    'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM',
               dict(num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                    final_logit_softcapping=3.0),
               dict(attention_pattern='sliding:8,global', norm='rms_plus_one', post_norms=True, embed_scale=True,
                    mlp_activation='gelu_tanh', head_dim=32, query_pre_attn_scalar=24.0, attn_logit_softcap=2.0,
                    final_logit_softcap=3.0, tie_embeddings=True),
               [dict(attention_pattern='global'), dict(norm='rms'), dict(embed_scale=False),
                dict(mlp_activation='silu'), dict(query_pre_attn_scalar=0.0), dict(attn_logit_softcap=0.0),
                dict(final_logit_softcap=0.0)]),
    # Gemma 3 text: two sliding layers to one global (and a fourth layer, sliding, after the repeat), each kind
    # with its RoPE (local base 100 unscaled; global 10000 with linear scaling 4), per-head (1 + w) q/k norms
    'gemma3_text': ('Gemma3TextConfig', 'Gemma3ForCausalLM',
                    dict(num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=24,
                         layer_types=['sliding_attention', 'sliding_attention', 'full_attention', 'sliding_attention'],
                         rope_parameters=dict(sliding_attention=dict(rope_type='default', rope_theta=100.0),
                                              full_attention=dict(rope_type='linear', factor=4.0, rope_theta=10000.0))),
                    dict(attention_pattern='sliding:8@100,sliding:8@100,global', rope_theta=10000.0,
                         rope_scaling='linear', rope_scaling_factor=4.0, qk_norm_per_head=True, norm='rms_plus_one',
                         post_norms=True, embed_scale=True, mlp_activation='gelu_tanh', attn_logit_softcap=0.0),
                    [dict(attention_pattern='sliding:8,sliding:8,global'), dict(rope_scaling='none'),
                     dict(qk_norm_per_head=False)]),
}


imported = hf_compare.imported_fixture(CASES, BASE, random_norms=True)


def _control(config, params, edit):
  """The negative control's config and parameters: `edit` applied, layers unrolled (a pattern changes how scanned
  layers are grouped) and, without qk_norm_per_head, the q/k norm scales dropped."""
  params = unstack_layers(params, train.create_model(config).cfg)
  other = config_lib.get_config()
  other.update(config.to_dict())
  other.model.update(edit, scan_layers=False)

  def strip(tree):
    if isinstance(tree, dict):
      return {k: strip(v) for k, v in tree.items() if other.model.qk_norm_per_head or k not in ('q_norm', 'k_norm')}
    return tree
  return other, strip(params)


@pytest.mark.parametrize('name', list(CASES))
def test_logits_match_transformers(imported, name):
  _, model, workdir, config, params = imported(name)
  ids, expected = check_logits(name, CASES[name], model, config, params)
  controls = CASES[name][4] if isinstance(CASES[name][4], list) else [CASES[name][4]]
  for control in controls:
    other, other_params = _control(config, params, control)
    assert np.max(np.abs(our_logits(other, other_params, ids) - expected)) > 1e-2, f'{control} does not matter'


@pytest.mark.parametrize('name', list(CASES))
def test_round_trip_gives_identical_tensors_and_loads_in_transformers(imported, tmp_path, name):
  hf_dir, model, workdir, config, _ = imported(name)
  check_export(hf_dir, workdir, str(tmp_path / 'out'), model, config.model.tie_embeddings)


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
    (dict(attention='cudnn', attn_logit_softcap=50.0), 'model.attention: cuDNN attention has no logit soft-cap'),
    (dict(attention_pattern='sliding'), 'model.attention_pattern'),
    (dict(attention_pattern='sliding:8@x'), 'model.attention_pattern'),
    (dict(attention_pattern='global,sliding:8', sliding_window=4), 'model.sliding_window'),
    (dict(ffn='moe', num_experts=4, mlp_activation='gelu_tanh'), 'model.mlp_activation'),
])
def test_config_refuses_bad_settings_by_name(edit, field):
  from llm_jax import validation
  config = config_lib.get_config()
  config.model.update(edit)
  with pytest.raises(config_lib.ConfigError, match=field):
    validation.validate(config, 1)
  if field == 'model.num_heads':  # the same shape is fine once the width is explicit
    config.model.head_dim = 16
    validation.validate(config, 1)


def test_pattern_is_the_same_on_xla_and_splash_scanned_and_unrolled():
  """A pattern of a 16-token window with its own RoPE base, a 40-token window and a global layer over 4 layers (one
  repeat scanned, the fourth layer unrolled after it), logits soft-capped at 0.5, on 128 tokens of two packed
  documents: the xla kernel unrolled (the reference), xla scanned and interpret-mode splash scanned give the same
  logits (float32, 1e-4); the all-global and the uncapped models do not (windows and cap are exercised)."""
  import dataclasses
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from llm_jax.model import Transformer, TransformerConfig
  cfg = TransformerConfig(vocab_size=61, d_model=32, num_layers=4, num_heads=2, num_kv_heads=1, ffn_dim=48,
                          head_dim=128, max_seq_len=128, dtype='float32', init_std=0.1, attention='xla',
                          attention_pattern='sliding:16@500,sliding:40,global', attn_logit_softcap=0.5)
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))['params']
  assert sorted(params['layers']) == ['block_0', 'block_1', 'block_2'] and 'layers_3' in params
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, (1, 128)))
  segments = jnp.asarray([[1] * 100 + [2] * 28])
  unrolled = unstack_layers(params, cfg)

  def logits(config, p):
    return np.asarray(jax.jit(lambda p: Transformer(config).apply({'params': p}, ids, segments))(p))

  reference = logits(dataclasses.replace(cfg, scan_layers=False), unrolled)
  for config in (cfg, dataclasses.replace(cfg, attention='splash')):
    np.testing.assert_allclose(logits(config, params), reference, atol=1e-4, err_msg=config.attention)
  for control in (dict(attention_pattern='global'), dict(attn_logit_softcap=0.0)):
    other = logits(dataclasses.replace(cfg, scan_layers=False, **control), unrolled)
    assert np.max(np.abs(other - reference)) > 1e-2, control


def _softcapped_attention_numpy(q, k, v, cotangent, cap):
  """float64 forward and hand-written backward of causal softmax(cap * tanh(q.k / sqrt(H) / cap)) . v, one head:
  (out, dq, dk, dv) for the loss sum(out * cotangent)."""
  q, k, v, cotangent = (x.astype(np.float64) for x in (q, k, v, cotangent))
  t, h = q.shape
  scores = q @ k.T / np.sqrt(h)
  tanh = np.tanh(scores / cap)
  capped = np.where(np.tril(np.ones((t, t), bool)), cap * tanh, -np.inf)
  probs = np.exp(capped - capped.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  out = probs @ v
  dv = probs.T @ cotangent
  dprobs = cotangent @ v.T
  dcapped = probs * (dprobs - np.sum(dprobs * probs, axis=-1, keepdims=True))
  dscores = dcapped * (1 - tanh ** 2)  # d(cap tanh(s / cap)) / ds; masked entries have zero probability
  return out, dscores @ k / np.sqrt(h), dscores.T @ q / np.sqrt(h), dv


def test_soft_capping_gradients_match_float64_numpy():
  """Attention logits soft-capped at 1.5 (where the cap bites: |q.k| / sqrt(H) reaches several units): the xla
  kernel's and interpret-mode splash's output and gradients against a float64 numpy forward and backward, within
  1e-4 of the largest entry (float32, blockwise sums in splash); and the output-logit cap's gradient, 1 - tanh^2."""
  import jax
  import jax.numpy as jnp
  from llm_jax.model import attention
  cap, t, h = 1.5, 128, 128
  rng = np.random.default_rng(0)
  q, k, v, cotangent = (rng.normal(size=(t, h)).astype(np.float32) for _ in range(4))
  expected = _softcapped_attention_numpy(q, k, v, cotangent, cap)
  uncapped = _softcapped_attention_numpy(q, k, v, cotangent, 1e6)
  assert np.max(np.abs(expected[1] - uncapped[1])) > 0.1 * np.max(np.abs(expected[1]))  # the cap matters here
  segments = jnp.ones((1, t), jnp.int32)
  info = attention.MaskInfo(segments, segments, True)
  kernels = {'xla': lambda q, k, v: attention.xla_attention(q, k, v, info, cap),
             'splash': lambda q, k, v: attention.splash_attention(q, k, v, info, cap, interpret=True)}
  for name, kernel in kernels.items():
    def loss(q, k, v):
      out = kernel(q[None, :, None], k[None, :, None], v[None, :, None])[0, :, 0]
      return jnp.sum(out * cotangent), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    for got, want in zip((out,) + grads, expected):
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.max(np.abs(want)), err_msg=name)
  x = np.linspace(-10, 10, 41).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(attention.soft_cap(x, 3.0)))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(grad), 1 - np.tanh(x.astype(np.float64) / 3.0) ** 2, atol=1e-6)


def test_gemma3_multimodal_checkpoint_imports_its_language_model(imported, tmp_path, capsys):
  """A Gemma3ForConditionalGeneration checkpoint (a tiny vision tower beside the gemma3_text case's language model):
  the import says once that the vision tower is skipped, its logits on text equal the wrapper's own (1e-4), and
  the export is a Gemma3ForCausalLM that transformers loads with the same logits."""
  text = dict(BASE, **CASES['gemma3_text'][2])
  vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                patch_size=14)
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
      text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if param_name.endswith('norm.weight') and 'language_model' in param_name:
        param.uniform_(0.5, 1.5)
  hf_dir, workdir, out = str(tmp_path / 'hf'), str(tmp_path / 'work'), str(tmp_path / 'out')
  model.save_pretrained(hf_dir)
  capsys.readouterr()
  config = convert.from_hf(hf_dir, workdir, dtype='float32')
  note = capsys.readouterr().err
  assert note.count('vision_tower.') == 1 and 'skipped' in note
  assert config.model.attention_pattern == 'sliding:8@100,sliding:8@100,global'
  from llm_jax import checkpoint
  params, _ = checkpoint.load_params(workdir, train.abstract_params(config))
  ids = tokens()
  expected = hf_logits(model, ids)
  assert np.max(np.abs(our_logits(config, params, ids) - expected)) <= TOL
  convert.to_hf(workdir, out)
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['architectures'] == ['Gemma3ForCausalLM']
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert np.max(np.abs(hf_logits(reloaded, ids) - expected)) <= TOL


def test_gemma3_4b_hub_config_reads_as_its_released_shape():
  """gemma-3-4b-it's config.json as the hub has it (text_config states only what differs from Gemma3TextConfig's
  defaults; RoPE as rope_scaling + the default bases): the language model's fields."""
  from llm_jax import families
  hub = {'architectures': ['Gemma3ForConditionalGeneration'], 'model_type': 'gemma3', 'mm_tokens_per_image': 256,
         'text_config': {'hidden_size': 2560, 'intermediate_size': 10240, 'model_type': 'gemma3_text',
                         'num_hidden_layers': 34, 'rope_scaling': {'factor': 8.0, 'rope_type': 'linear'},
                         'sliding_window': 1024},
         'vision_config': {'model_type': 'siglip_vision_model'}}
  assert families.check_supported(hub).architecture == 'Gemma3ForConditionalGeneration'
  fields = families.model_fields_from_hf(hub)
  assert {k: fields[k] for k in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                                 'ffn_dim', 'rope_theta', 'rope_scaling', 'rope_scaling_factor', 'tie_embeddings',
                                 'query_pre_attn_scalar')} == dict(
      vocab_size=262_208, d_model=2560, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256, ffn_dim=10240,
      rope_theta=1e6, rope_scaling='linear', rope_scaling_factor=8.0, tie_embeddings=True,
      query_pre_attn_scalar=256.0)
  assert fields['attention_pattern'] == ','.join(['sliding:1024@10000'] * 5 + ['global'])


@pytest.mark.parametrize('preset, architecture, released', [
    ('qwen3_8b', 'Qwen3ForCausalLM', 8_190_735_360),  # Qwen/Qwen3-8B
    ('gemma3_4b', 'Gemma3ForCausalLM', 3_880_263_168),  # google/gemma-3-4b-pt's language model
])
def test_presets_have_the_released_shapes(preset, architecture, released):
  """Parameter counts without allocating: ours (eval_shape), the FLOPs formula's, and transformers' model built from
  the exported config.json on the meta device (nothing allocated either), all the released model's."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from llm_jax import metrics, validation
  config = config_lib.load_experiment(preset)
  validation.validate(config, 8)
  shapes = jax.eval_shape(lambda r: nn.unbox(train.create_model(config).init(r, jnp.zeros((1, 8), jnp.int32))),
                          jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert count == metrics.total_params(config.model) == released
  hf = convert.hf_config_from_model(config.model, 'bfloat16', {})
  assert hf['architectures'] == [architecture]
  with torch.device('meta'):
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
  print(f'{preset}: {count:,} parameters')
  assert model.num_parameters() == count
