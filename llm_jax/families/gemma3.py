"""Gemma3ForCausalLM (Gemma 3 text: 1B, and the language model of 4B, 12B, 27B). Gemma 2's blocks (families/gemma2.py:
(1 + w) RMSNorm, sandwich norms, GeGLU, embedding scale, query_pre_attn_scalar) with

  an RMSNorm (1 + w) of each query and key head over head_dim     qk_norm_per_head
  five sliding layers to one global (layer_types)                 attention_pattern 'sliding:W@LOCAL' x5, 'global'
  a RoPE per kind: local base 10k on sliding layers, global base  the sliding kinds' @LOCAL (unscaled); the
  1M with linear scaling 8 on global ones (4B and up)             model's rope_theta / rope_scaling on global ones
  no soft-caps (the fields are kept: both ways if set)

The RoPE arrives as rope_parameters per layer type (transformers >= 5) or as rope_theta, rope_scaling and
rope_local_base_freq (the hub's config.json files).
"""

import dataclasses

from llm_jax.families import gemma2, qwen3
from llm_jax.families.base import Family, hf_rope, layer_windows
from llm_jax.model.layer_pattern import parse_pattern


def hf_view(hf: dict, refuse) -> dict:
  """The global layers' RoPE as the one rope_parameters; the local base kept as rope_local_base_freq."""
  rope = hf.get('rope_parameters') or {}
  if 'full_attention' not in rope and 'sliding_attention' not in rope:
    return hf
  local = rope.get('sliding_attention') or {}
  if refuse is not None and local.get('rope_type', 'default') != 'default':
    refuse('rope_parameters.sliding_attention', f'rope scaling of type {local["rope_type"]!r} on the sliding layers '
           'is not supported (implemented: default)')
  flat = dict(hf, rope_parameters=rope.get('full_attention') or {'rope_type': 'default'}, rope_scaling=None)
  flat['rope_local_base_freq'] = float(local.get('rope_theta', hf.get('rope_local_base_freq', 10000.0)))
  return flat


def import_fields(hf: dict) -> dict:
  kinds = hf.get('layer_types') or [
      'sliding_attention' if (i + 1) % hf.get('sliding_window_pattern', 6) else 'full_attention'
      for i in range(hf['num_hidden_layers'])]
  local_theta = float(hf.get('rope_local_base_freq', 10000.0))
  return dict(gemma2.import_fields(dict(hf, layer_types=kinds)),
              attention_pattern=gemma2.pattern_of(hf, kinds, local_theta))


def expresses_pattern(model) -> bool:
  """One window and one RoPE base over the sliding kinds, the model's RoPE on the global ones (and on the sliding
  ones only when it is unscaled: transformers scales only the global RoPE)."""
  kinds = parse_pattern(model.get('attention_pattern', 'global'))
  sliding = {(k.window, k.rope_theta) for k in kinds if k.window}
  return (not any(k.rope_theta for k in kinds if not k.window) and len(sliding) <= 1
          and not model.sliding_window
          and all(theta or model.rope_scaling == 'none' for _, theta in sliding))


def export_fields(model, window) -> dict:
  kinds = parse_pattern(model.attention_pattern)
  local = next((k.rope_theta for k in kinds if k.window and k.rope_theta), 0.0) or model.rope_theta
  del window  # each layer's comes from the pattern
  return dict(gemma2.common_export_fields(model), rope_scaling=None, rope_local_base_freq=local,
              rope_parameters=dict(full_attention=hf_rope(model),
                                   sliding_attention=dict(rope_type='default', rope_theta=local)),
              use_bidirectional_attention=False, sliding_window=max(layer_windows(model)) or 4096)


# Gemma3TextConfig's defaults (transformers 5): the hub's Gemma3ForConditionalGeneration config.json files state only
# the text_config fields that differ from them (gemma-3-4b: hidden_size, intermediate_size, num_hidden_layers, ...).
TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                     rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1_000_000.0,
                     rope_local_base_freq=10_000.0, hidden_activation='gelu_pytorch_tanh', initializer_range=0.02)


def multimodal_view(hf: dict, refuse) -> dict:
  """Gemma3ForConditionalGeneration's config.json as its language model's: text_config over TEXT_DEFAULTS, with
  the wrapper's architecture and model_type (what check_supported compares) and its embedding tie."""
  text = {**TEXT_DEFAULTS, **(hf.get('text_config') or {}), 'architectures': hf.get('architectures'),
          'model_type': hf.get('model_type')}
  text['tie_word_embeddings'] = hf.get('tie_word_embeddings', text.get('tie_word_embeddings', True))
  return hf_view(text, refuse)


FAMILY = Family('gemma3_text', 'Gemma3ForCausalLM', qkv_bias=False, has_window=True,
                tensors=dataclasses.replace(gemma2.TENSORS, layer=gemma2.TENSORS.layer + qwen3.QK_NORMS),
                must_be=(('attention_bias', False), ('use_bidirectional_attention', False)),
                activation=gemma2.ACTIVATION, import_fields=import_fields, export_fields=export_fields,
                expresses_pattern=expresses_pattern, style=gemma2.STYLE, qk_norm_per_head=True, hf_view=hf_view)


def _in_language_model(tensors):
  return tuple(dataclasses.replace(t, hf='language_model.' + t.hf) for t in tensors)


# Import only: the language model of a Gemma3ForConditionalGeneration checkpoint (language_model.model.*, the form
# transformers saves and the hub holds); the vision tower and projector are skipped, said once; its export is a
# Gemma3ForCausalLM.
MULTIMODAL = dataclasses.replace(
    FAMILY, model_type='gemma3', architecture='Gemma3ForConditionalGeneration', hf_view=multimodal_view,
    tensors=dataclasses.replace(FAMILY.tensors, model=_in_language_model(FAMILY.tensors.model),
                                layer=_in_language_model(FAMILY.tensors.layer)),
    skipped=('vision_tower.', 'multi_modal_projector.'), exports=False)
