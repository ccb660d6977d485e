"""Hugging Face model families, one module each (llama.py, mistral.py, qwen2.py, qwen3.py; the mixtures of
experts mixtral.py, qwen2_moe.py, olmoe.py, qwen3_moe.py; gemma2.py, gemma3.py): tensor-name map, config
translation both ways, quirks. `llm_jax.convert` is the CLI and the safetensors I/O over them.

Adding a family: a module here building a `base.Family` (its tensors, its window form, the HF fields it must
refuse), and one line in FAMILIES. Nothing else in the package or in convert.py names a family.
"""

from __future__ import annotations

from llm_jax.families import gemma2, gemma3, llama, mistral, mixtral, olmoe, qwen2, qwen2_moe, qwen3, qwen3_moe
from llm_jax.families.base import ConversionError, Family, Slot, check_plan_covers, check_rope, plan

# model_type -> family; export tries them in this order (bias -> qwen2, window -> mistral; experts: the MoE ones)
FAMILIES: dict[str, Family] = {f.model_type: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, mixtral.FAMILY,
                                                         qwen2_moe.FAMILY, olmoe.FAMILY, qwen3.FAMILY,
                                                         qwen3_moe.FAMILY, gemma2.FAMILY, gemma3.FAMILY,
                                                         gemma3.MULTIMODAL)}

__all__ = ['FAMILIES', 'ConversionError', 'Family', 'Slot', 'check_plan_covers', 'check_supported', 'plan',
           'export_family', 'model_fields_from_hf']


def check_supported(hf: dict, source: str = 'config.json') -> Family:
  """The family of a HF config; ConversionError naming the first field whose model llm_jax does not implement."""
  def refuse(field, message):
    raise ConversionError(f'{source}: {field}: {message}; llm_jax implements {", ".join(FAMILIES)} models '
                          f'({", ".join(f.architecture for f in FAMILIES.values())}) without it, so this checkpoint '
                          'is not converted')

  family = FAMILIES.get(hf.get('model_type'))
  if family is None:
    refuse('model_type', f'{hf.get("model_type")!r} is not supported (expected one of {", ".join(FAMILIES)})')
  hf = family.hf_view(hf, refuse)
  architectures = hf.get('architectures') or [family.architecture]
  if list(architectures) != [family.architecture]:
    refuse('architectures', f'{architectures} is not supported (expected ["{family.architecture}"])')
  for field in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads'):
    if field not in hf:
      raise ConversionError(f'{source}: {field}: missing')
  check_rope(hf, refuse)
  for field, implemented in family.must_be + (family.activation,):
    if hf.get(field, implemented) != implemented:
      refuse(field, f'{hf[field]!r} is not supported (expected {implemented!r})')
  if hf.get('quantization_config'):
    refuse('quantization_config', 'quantised weights are not supported')
  head_dim = hf.get('head_dim')
  if head_dim is not None and (head_dim <= 0 or head_dim % 2):
    refuse('head_dim', f'{head_dim} is not supported (expected a positive even width, for RoPE)')
  family.window(hf, refuse)
  return family


def model_fields_from_hf(hf: dict) -> dict:
  """config.model fields of the model a (checked) HF config describes."""
  return FAMILIES[hf['model_type']].model_fields(hf)


def export_family(model, preferred: str | None = None) -> Family:
  """The HF architecture a model exports as: `preferred` (the one it was imported from) when it can express the
  model, else the first family that can."""
  for name in ([preferred] if preferred in FAMILIES else []) + list(FAMILIES):
    if FAMILIES[name].expresses(model):
      return FAMILIES[name]
  raise ConversionError(f'config.model.sliding_window={model.sliding_window} with qkv_bias={model.qkv_bias}, '
                        f'ffn={model.get("ffn", "dense")}, qk_norm={model.get("qk_norm", False)}, '
                        f'qk_norm_per_head={model.get("qk_norm_per_head", False)}, shared_expert_ffn_dim='
                        f'{model.get("shared_expert_ffn_dim", 0)}, router_norm_topk={model.get("router_norm_topk", True)}: no '
                        'Hugging Face architecture among ' + ', '.join(FAMILIES) + ' expresses this model')
