"""Qwen3MoeForCausalLM (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (no biases, each query and key head
RMS-normalised over head_dim: config.model.qk_norm_per_head; an explicit head_dim) with routed SwiGLU experts of
moe_intermediate_size in every layer and no shared expert. Router: softmax, top-k, renormalised only when
norm_topk_prob (the released models: renormalised). A window, when use_sliding_window, is on every layer. Layers
without experts (decoder_sparse_step > 1, mlp_only_layers) are refused: llm_jax has one FFN kind for every layer."""

from llm_jax.families import qwen3
from llm_jax.families.base import Family, moe_expressed, moe_tensors


def window(hf: dict, refuse) -> int:
  return int(hf.get('sliding_window') or 0) if hf.get('use_sliding_window', False) else 0


def import_fields(hf: dict) -> dict:
  # the hub's config.json says num_experts; transformers 5 saves the same field as num_local_experts
  return dict(ffn='moe', num_experts=hf.get('num_experts') or hf['num_local_experts'], experts_per_token=hf['num_experts_per_tok'],
              expert_ffn_dim=hf['moe_intermediate_size'], router_norm_topk=bool(hf.get('norm_topk_prob', False)),
              router_aux_loss_coef=float(hf.get('router_aux_loss_coef', 0.001)))


def export_fields(model, window) -> dict:
  return dict(use_sliding_window=bool(window), sliding_window=window, num_experts=model.num_experts,
              num_experts_per_tok=model.experts_per_token, moe_intermediate_size=model.expert_ffn_dim or model.ffn_dim,
              norm_topk_prob=model.router_norm_topk, decoder_sparse_step=1, mlp_only_layers=[],
              router_aux_loss_coef=model.router_aux_loss_coef, output_router_logits=False, attention_bias=False)


FAMILY = Family('qwen3_moe', 'Qwen3MoeForCausalLM', qkv_bias=False, has_window=True, window=window,
                tensors=moe_tensors('mlp', {'gate': 'gate_proj', 'up': 'up_proj', 'down': 'down_proj'}, qwen3.QK_NORMS),
                must_be=(('attention_bias', False), ('decoder_sparse_step', 1), ('mlp_only_layers', [])),
                import_fields=import_fields, export_fields=export_fields,
                expresses_ffn=moe_expressed(shared=False, qk_norm=False), qk_norm_per_head=True)
