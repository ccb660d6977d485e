"""MistralForCausalLM: the LLaMA layout with one sliding window for every layer (`sliding_window`)."""

from llm_jax.families.base import Family


def window(hf: dict, refuse) -> int:
  kinds = set(hf.get('layer_types') or ())
  if len(kinds) > 1:
    refuse('layer_types', f'{sorted(kinds)}: different attention per layer is not supported')
  return int(hf.get('sliding_window') or 0)


FAMILY = Family('mistral', 'MistralForCausalLM', qkv_bias=False, has_window=True, window=window,
                export_fields=lambda model, window: dict(sliding_window=window))
