"""Qwen3ForCausalLM (Qwen3 0.6B-32B dense): the LLaMA layout without biases, with an RMSNorm of every query and key
head over head_dim before RoPE (q_norm, k_norm [H]: config.model.qk_norm_per_head) and an explicit head_dim (0.6B:
1024 wide with 16 heads of 128). Windows, on every layer or some (attention_pattern), are stated as Qwen2's
(use_sliding_window, max_window_layers, layer_types)."""

import dataclasses

from llm_jax.families import qwen2
from llm_jax.families.base import LLAMA_TENSORS, Family, Same, Tensor, layer_types_pattern

QK_NORMS = (Tensor('model.layers.{i}.self_attn.q_norm.weight', ('attn', 'q_norm', 'scale'), Same()),  # [H]
            Tensor('model.layers.{i}.self_attn.k_norm.weight', ('attn', 'k_norm', 'scale'), Same()))  # [H]


def export_fields(model, window) -> dict:
  return dict(qwen2.export_fields(model, window), attention_bias=False)


FAMILY = Family('qwen3', 'Qwen3ForCausalLM', qkv_bias=False, has_window=True, window=qwen2.window,
                tensors=dataclasses.replace(LLAMA_TENSORS, layer=LLAMA_TENSORS.layer + QK_NORMS),
                must_be=(('attention_bias', False),), import_fields=qwen2.import_fields, export_fields=export_fields,
                qk_norm_per_head=True, expresses_pattern=layer_types_pattern)
