"""MixtralForCausalLM: Mistral's attention (one sliding window or none) with a sparse mixture of SwiGLU experts in
every layer. Router: softmax over all experts, top-k, renormalised (always). Checkpoint names: the router
`block_sparse_moe.gate`, experts `block_sparse_moe.experts.{j}.w1` (gate), `w3` (up), `w2` (down), the form
transformers' save_pretrained writes and the hub's checkpoints hold."""

from llm_jax.families import mistral
from llm_jax.families.base import Family, moe_expressed, moe_tensors


def import_fields(hf: dict) -> dict:
  return dict(ffn='moe', num_experts=hf['num_local_experts'], experts_per_token=hf['num_experts_per_tok'],
              expert_ffn_dim=hf['intermediate_size'], router_norm_topk=True,
              router_aux_loss_coef=float(hf.get('router_aux_loss_coef', 0.02)))


def export_fields(model, window) -> dict:
  return dict(sliding_window=window, num_local_experts=model.num_experts, num_experts_per_tok=model.experts_per_token,
              intermediate_size=model.expert_ffn_dim or model.ffn_dim, router_aux_loss_coef=model.router_aux_loss_coef,
              router_jitter_noise=0.0, output_router_logits=False)


FAMILY = Family('mixtral', 'MixtralForCausalLM', qkv_bias=False, has_window=True, window=mistral.window,
                tensors=moe_tensors('block_sparse_moe', {'gate': 'w1', 'up': 'w3', 'down': 'w2'}),
                import_fields=import_fields, export_fields=export_fields,
                expresses_ffn=moe_expressed(shared=False, qk_norm=False, norm_topk=True))
