"""Qwen2MoeForCausalLM (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) with routed SwiGLU experts
of moe_intermediate_size and a shared expert of shared_expert_intermediate_size gated by sigmoid(x . w) in every
layer, and Qwen2's windows (on some layers: attention_pattern). Router: softmax, top-k, renormalised only when
norm_topk_prob. Layers without experts (decoder_sparse_step > 1, mlp_only_layers) are refused: llm_jax has one FFN
kind for every layer."""

from llm_jax.families import qwen2
from llm_jax.families.base import Family, Linear, Tensor, layer_types_pattern, moe_expressed, moe_tensors

SHARED = tuple(Tensor(f'model.layers.{{i}}.mlp.shared_expert.{hf}_proj.weight', ('mlp', 'shared', ours, 'kernel'),
                      Linear()) for ours, hf in (('gate', 'gate'), ('up', 'up'), ('down', 'down'))) + (
    Tensor('model.layers.{i}.mlp.shared_expert_gate.weight', ('mlp', 'shared_gate', 'kernel'), Linear()),)


def import_fields(hf: dict) -> dict:
  return dict(qwen2.import_fields(hf), ffn='moe', num_experts=hf['num_experts'], experts_per_token=hf['num_experts_per_tok'],
              expert_ffn_dim=hf['moe_intermediate_size'], shared_expert_ffn_dim=hf['shared_expert_intermediate_size'],
              router_norm_topk=bool(hf.get('norm_topk_prob', False)),
              router_aux_loss_coef=float(hf.get('router_aux_loss_coef', 0.001)))


def export_fields(model, window) -> dict:
  return dict(qwen2.export_fields(model, window), num_experts=model.num_experts,
              num_experts_per_tok=model.experts_per_token, moe_intermediate_size=model.expert_ffn_dim or model.ffn_dim,
              shared_expert_intermediate_size=model.shared_expert_ffn_dim, norm_topk_prob=model.router_norm_topk,
              decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=model.router_aux_loss_coef,
              output_router_logits=False, qkv_bias=True)


FAMILY = Family('qwen2_moe', 'Qwen2MoeForCausalLM', qkv_bias=True, has_window=True, window=qwen2.window,
                tensors=moe_tensors('mlp', {'gate': 'gate_proj', 'up': 'up_proj', 'down': 'down_proj'}, SHARED),
                must_be=(('decoder_sparse_step', 1), ('mlp_only_layers', [])),
                import_fields=import_fields, export_fields=export_fields,
                expresses_ffn=moe_expressed(shared=True, qk_norm=False), expresses_pattern=layer_types_pattern)
