"""Qwen2ForCausalLM: Qwen2, Qwen2.5. q/k/v biases; a sliding window on every layer (sliding_window) or on some
(config.model.attention_pattern). Qwen2 states it as use_sliding_window + max_window_layers (layers from that
index on are windowed), newer transformers also as layer_types, which wins when present."""

from llm_jax.families.base import Family, layer_types_pattern, layer_windows, repeating_pattern


def _layer_types(hf: dict) -> list[str]:
  if not hf.get('use_sliding_window', False):
    return ['full_attention'] * hf['num_hidden_layers']
  return hf.get('layer_types') or ['sliding_attention' if i >= hf.get('max_window_layers', 28) else 'full_attention'
                                   for i in range(hf['num_hidden_layers'])]


def window(hf: dict, refuse) -> int:
  """The window when every layer has it; 0 for none or some (import_fields gives those as a pattern)."""
  kinds = set(_layer_types(hf))
  return (hf.get('sliding_window') or 0) if kinds == {'sliding_attention'} else 0


def import_fields(hf: dict) -> dict:
  kinds = _layer_types(hf)
  if len(set(kinds)) == 1:
    return {}
  window = hf.get('sliding_window') or 0
  return dict(attention_pattern=repeating_pattern(
      [f'sliding:{window}' if k == 'sliding_attention' and window else 'global' for k in kinds]))


def export_fields(model, window) -> dict:
  windows = layer_windows(model)
  sliding = [w > 0 for w in windows]
  return dict(use_sliding_window=any(sliding), sliding_window=max(windows) or None,
              max_window_layers=sliding.index(True) if any(sliding) else model.num_layers,
              layer_types=['sliding_attention' if s else 'full_attention' for s in sliding])


FAMILY = Family('qwen2', 'Qwen2ForCausalLM', qkv_bias=True, has_window=True, window=window,
                import_fields=import_fields, export_fields=export_fields, expresses_pattern=layer_types_pattern)
