"""Qwen2ForCausalLM: Qwen2, Qwen2.5. q/k/v biases; a sliding window only when every layer has it (Qwen2 states
it as use_sliding_window + max_window_layers, newer transformers also as layer_types)."""

from llm_jax.families.base import Family


def window(hf: dict, refuse) -> int:
  if not hf.get('use_sliding_window', False):
    return 0
  layers = hf['num_hidden_layers']
  kinds = hf.get('layer_types') or ['sliding_attention' if i >= hf.get('max_window_layers', 28) else
                                    'full_attention' for i in range(layers)]
  if len(set(kinds)) > 1:
    refuse('max_window_layers', 'a sliding window on some layers only is not supported (llm_jax uses one window '
           'for every layer)')
  return (hf.get('sliding_window') or 0) if kinds and kinds[0] == 'sliding_attention' else 0


def export_fields(model, window) -> dict:
  return dict(use_sliding_window=bool(window), sliding_window=window,
              max_window_layers=0 if window else model.num_layers,
              layer_types=['sliding_attention' if window else 'full_attention'] * model.num_layers)


FAMILY = Family('qwen2', 'Qwen2ForCausalLM', qkv_bias=True, has_window=True, window=window,
                export_fields=export_fields)
