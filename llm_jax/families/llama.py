"""LlamaForCausalLM: LLaMA 2, 3, 3.1, 3.2 (rope scaling llama3 or linear, tied or untied embeddings); no biases,
no sliding window."""

from llm_jax.families.base import Family

FAMILY = Family(
    'llama', 'LlamaForCausalLM', qkv_bias=False, has_window=False,
    must_be=(('attention_bias', False), ('mlp_bias', False)),
    export_fields=lambda model, window: dict(attention_bias=False, mlp_bias=False))
