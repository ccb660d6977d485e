"""Serving: a paged, continuously batched engine (engine.py) and its asyncio front (async_engine.py).

The model only learns to read and write K/V through a page table (model.attention.PageTable); everything about
requests, pages, batching and sampling settings lives here. The HTTP server (llm_jax.openai_server) sits on top
and this package never imports it.
"""

from llm_jax.serving.batch import PromptError, complete, complete_workdir, generate_ids
from llm_jax.serving.engine import Engine, EngineConfig, QueueFullError, RequestError
from llm_jax.serving.outputs import CompletionOutput, RequestOutput
from llm_jax.serving.sampling import SamplingError, SamplingParams

__all__ = ['CompletionOutput', 'Engine', 'EngineConfig', 'PromptError', 'QueueFullError', 'RequestError',
           'RequestOutput', 'SamplingError', 'SamplingParams', 'complete', 'complete_workdir', 'generate_ids']
