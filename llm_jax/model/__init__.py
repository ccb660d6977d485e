"""The model: pure-functional flax.linen modules. Imports only jax, flax and numpy (never data or TensorFlow)."""

from llm_jax.model.transformer import REMAT_POLICIES, Transformer, TransformerConfig, check_config, head_dim_of, init_cache

__all__ = ['REMAT_POLICIES', 'Transformer', 'TransformerConfig', 'check_config', 'head_dim_of', 'init_cache']
