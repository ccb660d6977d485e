"""llm_jax: pre-train and fine-tune decoder-only language models with JAX/Flax, from a CPU test to a pod."""

__version__ = '0.1.0'
