"""The model: pure-functional flax.linen modules. Imports only jax, flax and numpy (never data or TensorFlow)."""

from llm_jax.model.layer_pattern import LAYER_KINDS, layer_location
from llm_jax.model.transformer import (REMAT_POLICIES, Transformer, TransformerConfig, check_config, head_dim_of,
                                       init_cache)

__all__ = ['LAYER_KINDS', 'REMAT_POLICIES', 'Transformer', 'TransformerConfig', 'check_config', 'head_dim_of',
           'init_cache', 'layer_location']
