"""Offline batches through the engine: what generate, evaluate, the harness and the training loop's generation
tasks call. The engine is sized to the batch (rows, pages), so a short list of prompts allocates a small pool.

  complete(model_config, params, tokenizer, texts, max_new_tokens, sampling)  -> texts (generated part only)
  generate_ids(model_config, params, prompts, max_new_tokens, sampling, ...)  -> token ids (generated part only)
  complete_workdir(loaded, texts, ...)                                        a workdir's model, its mesh, its
                                                                              prompt encoder (chat template)

As the static decoder did, a prompt leaves room for at most max_seq_len - len(prompt) new tokens, and prompt i is
sampled with seed + i.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from llm_jax.decoding import PromptError  # the same error type as the reference decoder's
from llm_jax.model import TransformerConfig
from llm_jax.serving.engine import Engine, EngineConfig
from llm_jax.serving.sampling import SamplingParams

MAX_BATCH_SEQS = 64  # rows decoding at once for an offline batch


def generate_ids(model_config: TransformerConfig, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams | None = None, eos_id: int | None = None, vocab_limit: int | None = None,
                 tokenizer: Any = None, mesh=None, rules=(), page_size: int = 16) -> list[list[int]]:
  """New token ids of each prompt (EOS included when reached), through an engine sized for this batch."""
  sampling = sampling or SamplingParams(temperature=0.0)
  if max_new_tokens <= 0:
    raise PromptError(f'max_new_tokens must be positive, got {max_new_tokens}')
  if not prompts:
    raise PromptError('no prompts given')
  limit = model_config.max_seq_len
  for i, prompt in enumerate(prompts):
    if not len(prompt):
      raise PromptError(f'prompt {i} is empty')
    if len(prompt) >= limit:
      raise PromptError(f'prompt {i} has {len(prompt)} tokens; model.max_seq_len={limit} leaves no room to '
                        f'generate (at most {limit - 1} prompt tokens)')
  rows = min(len(prompts), MAX_BATCH_SEQS)
  longest = max(min(len(p) + max_new_tokens, limit) for p in prompts)
  pages = rows * -(-longest // page_size) + 1
  config = EngineConfig(page_size=page_size, num_pages=pages, max_seqs=rows, max_queue=len(prompts) + 1)
  engine = Engine(model_config, params, tokenizer, config, mesh, rules, eos_id=eos_id)
  if vocab_limit is not None:
    engine.vocab_limit = vocab_limit
  seed = sampling.seed if sampling.seed is not None else 0
  settings = [dataclasses.replace(sampling, max_tokens=min(max_new_tokens, limit - len(p)), seed=seed + i, stop=())
              for i, p in enumerate(prompts)]
  return [out.outputs[0].token_ids for out in engine.generate([list(p) for p in prompts], settings)]


def complete(model_config: TransformerConfig, params: Any, tokenizer: Any, texts: Sequence[str], max_new_tokens: int,
             sampling: SamplingParams | None = None, encode: Callable[[str], list[int]] | None = None, mesh=None,
             rules=()) -> list[str]:
  """Completions of `texts` (the generated text, without the prompt and the EOS). `encode` turns a text into
  prompt tokens (default tokenizer.encode; a fine-tuned model is prompted through its chat template:
  llm_jax.tasks.prompt_encoder)."""
  encode = encode or tokenizer.encode
  for i, text in enumerate(texts):
    if not text:
      raise PromptError(f'prompt {i} is empty')
  ids = [list(encode(text)) for text in texts]
  new = generate_ids(model_config, params, ids, max_new_tokens, sampling, tokenizer.eos_id, tokenizer.vocab_size,
                     tokenizer, mesh, rules)
  return [tokenizer.decode([t for t in row if t != tokenizer.eos_id]) for row in new]


def complete_workdir(loaded: Any, texts: Sequence[str], max_new_tokens: int, sampling: SamplingParams | None = None,
                     chat: bool | None = None) -> list[str]:
  """`complete` with a loaded workdir's model, parameters, mesh and prompt encoder (llm_jax.workdir.LoadedModel)."""
  return complete(loaded.model_config, loaded.params, loaded.tokenizer, texts, max_new_tokens, sampling,
                  loaded.prompt_encoder(chat), loaded.runtime.mesh, loaded.runtime.rules)
