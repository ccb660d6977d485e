"""Gemma2ForCausalLM (Gemma 2 2B, 9B, 27B). What sets it apart, each a config.model field:

  RMSNorm scaled by (1 + w), w stored                   norm = rms_plus_one
  a norm after the attention and after the MLP too       post_norms (post_attention_layernorm is that norm here,
                                                         pre_feedforward_layernorm the MLP's input norm)
  GeGLU with GELU's tanh form (gelu_pytorch_tanh)        mlp_activation = gelu_tanh
  embeddings times sqrt(hidden_size)                     embed_scale
  logits q.k / sqrt(query_pre_attn_scalar)               query_pre_attn_scalar
  attention and output logits soft-capped                attn_logit_softcap, final_logit_softcap
  sliding and global layers alternating (layer_types)    attention_pattern 'sliding:W,global'
  head_dim 256 (wider than hidden_size / heads)          head_dim
"""

import dataclasses

from llm_jax.families.base import (LLAMA_TENSORS, Family, Same, Tensor, layer_types_pattern, layer_windows,
                                   repeating_pattern)
from llm_jax.model import head_dim_of

_NORMS = {  # HF -> ours: Gemma names its four norms after their place, not after what follows them
    'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'post_attn_norm',
    'pre_feedforward_layernorm': 'mlp_norm', 'post_feedforward_layernorm': 'post_mlp_norm'}
TENSORS = dataclasses.replace(
    LLAMA_TENSORS, layer=tuple(t for t in LLAMA_TENSORS.layer if t.ours[1:] != ('scale',)) + tuple(
        Tensor(f'model.layers.{{i}}.{hf}.weight', (ours, 'scale'), Same()) for hf, ours in _NORMS.items()))
STYLE = (('norm', 'rms_plus_one'), ('post_norms', True), ('mlp_activation', 'gelu_tanh'), ('embed_scale', True),
         ('query_pre_attn_scalar', None), ('attn_logit_softcap', None), ('final_logit_softcap', None))
ACTIVATION = ('hidden_activation', 'gelu_pytorch_tanh')


def default_layer_types(layers: int) -> list[str]:
  """Gemma 2's when config.json has no layer_types: sliding first, then global, alternating."""
  return ['sliding_attention' if (i + 1) % 2 else 'full_attention' for i in range(layers)]


def pattern_of(hf: dict, kinds: list[str], local_theta: float = 0.0) -> str:
  """attention_pattern of per-layer HF kinds (sliding layers with `local_theta` as their own RoPE base, if any)."""
  window = hf.get('sliding_window') or 0
  sliding = f'sliding:{window}' + (f'@{local_theta:g}' if local_theta else '') if window else 'global'
  return repeating_pattern([sliding if k == 'sliding_attention' else 'global' for k in kinds])


def import_fields(hf: dict) -> dict:
  kinds = hf.get('layer_types') or default_layer_types(hf['num_hidden_layers'])
  return dict(attention_pattern=pattern_of(hf, kinds), query_pre_attn_scalar=float(hf['query_pre_attn_scalar']),
              attn_logit_softcap=float(hf.get('attn_logit_softcapping') or 0.0),
              final_logit_softcap=float(hf.get('final_logit_softcapping') or 0.0))


def common_export_fields(model) -> dict:
  """Gemma 2 and 3 alike: their activation field, the query scale, the soft-caps, each layer's kind."""
  windows = layer_windows(model)
  scalar = model.query_pre_attn_scalar or head_dim_of(model)
  return dict(hidden_activation=ACTIVATION[1], hidden_act=ACTIVATION[1],
              query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,  # transformers: an int
              attn_logit_softcapping=model.attn_logit_softcap or None,
              final_logit_softcapping=model.final_logit_softcap or None, attention_bias=False,
              sliding_window=max(windows) or None,
              layer_types=['sliding_attention' if w else 'full_attention' for w in windows])


FAMILY = Family('gemma2', 'Gemma2ForCausalLM', qkv_bias=False, has_window=True, tensors=TENSORS,
                must_be=(('attention_bias', False),), activation=ACTIVATION,
                import_fields=import_fields, export_fields=lambda model, window: common_export_fields(model),
                expresses_pattern=layer_types_pattern, style=STYLE)
