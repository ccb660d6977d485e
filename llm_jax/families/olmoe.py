"""OlmoeForCausalLM (OLMoE-1B-7B): LLaMA attention with an RMSNorm of the queries and keys over all their heads
(q_norm [N*H], k_norm [K*H], before RoPE: config.model.qk_norm) and routed SwiGLU experts of intermediate_size in
every layer, no shared expert. Router: softmax, top-k, renormalised only when norm_topk_prob (OLMoE-1B-7B: not).
clip_qkv (clamping q, k, v) is refused."""

from llm_jax.families.base import Family, Same, Tensor, moe_expressed, moe_tensors

QK_NORMS = (Tensor('model.layers.{i}.self_attn.q_norm.weight', ('attn', 'q_norm', 'scale'), Same()),  # [N*H]
            Tensor('model.layers.{i}.self_attn.k_norm.weight', ('attn', 'k_norm', 'scale'), Same()))  # [K*H]


def import_fields(hf: dict) -> dict:
  return dict(ffn='moe', qk_norm=True, num_experts=hf['num_experts'], experts_per_token=hf['num_experts_per_tok'],
              expert_ffn_dim=hf['intermediate_size'], router_norm_topk=bool(hf.get('norm_topk_prob', False)),
              router_aux_loss_coef=float(hf.get('router_aux_loss_coef', 0.01)))


def export_fields(model, window) -> dict:
  return dict(num_experts=model.num_experts, num_experts_per_tok=model.experts_per_token,
              intermediate_size=model.expert_ffn_dim or model.ffn_dim, norm_topk_prob=model.router_norm_topk,
              router_aux_loss_coef=model.router_aux_loss_coef, output_router_logits=False, attention_bias=False,
              clip_qkv=None)


FAMILY = Family('olmoe', 'OlmoeForCausalLM', qkv_bias=False, has_window=False,
                tensors=moe_tensors('mlp', {'gate': 'gate_proj', 'up': 'up_proj', 'down': 'down_proj'}, QK_NORMS),
                must_be=(('attention_bias', False), ('clip_qkv', None)),
                import_fields=import_fields, export_fields=export_fields,
                expresses_ffn=moe_expressed(shared=False, qk_norm=True))
