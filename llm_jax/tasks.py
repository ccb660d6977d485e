"""Generation tasks: prompts -> greedy completions -> BLEU/ROUGE, for the training loop and for evaluate.

  prompt_encoder(config, tokenizer, chat=None)   text -> prompt tokens: the SFT chat template for a run on
                                                 data.source=sft_jsonl (or when chat=True), plain encode otherwise
  generation_tasks(config, params, workdir, step, writer)   the training loop's hook (eval.task_file)

A model fine-tuned on sft_jsonl learnt to answer after `<|user|>\\n{prompt}\\n<|assistant|>\\n`
(llm_jax.data.sft.encode_prompt), or after its tokenizer's own chat template's user turn and generation prompt
when the tokenizer has one; prompted with the raw text it would continue the user's turn instead.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from llm_jax import text_metrics
from llm_jax.data import sft
from llm_jax.data import tokenizer as tokenizer_lib

CHAT_SOURCES = ('sft_jsonl',)  # data sources whose examples are rendered with the chat template


def uses_chat_template(config) -> bool:
  """True when the run trained on chat-templated examples (config.data.source=sft_jsonl)."""
  return config.data.source in CHAT_SOURCES


def prompt_encoder(config, tokenizer: Any, chat: bool | None = None) -> Callable[[str], list[int]]:
  """text -> prompt tokens. `chat` None follows the run's data source (uses_chat_template)."""
  if chat is None:
    chat = uses_chat_template(config)
  if not chat:
    return tokenizer.encode
  return functools.partial(sft.encode_prompt, tokenizer)


def generation_tasks(config, workdir: str, step: int, writer,
                     complete: Callable[[list[str], Callable[[str], list[int]], Any], list[str]]) -> dict[str, float]:
  """The training loop's hook: greedy completions of config.eval.task_file, scored (text_metrics) and logged.

  Writes one metrics row {step, task_bleu, task_rouge1, task_rouge2, task_rougeL, task_examples} and
  config.eval.log_samples samples (metrics.jsonl row `task_samples`, TensorBoard text `samples/i`). Needs the
  workdir's tokenizer; prompts go through `prompt_encoder` (the chat template on sft_jsonl runs).
  `complete(texts, encode, tokenizer)` decodes (the training loop passes the serving engine on its parameters:
  this module sits below it). Returns the row.
  """
  e = config.eval
  records = text_metrics.read_tasks(e.task_file, e.task_max_examples)
  tokenizer = tokenizer_lib.load_from_workdir(workdir)
  completions = complete([r['prompt'] for r in records], prompt_encoder(config, tokenizer), tokenizer)
  result, samples = text_metrics.score_tasks(records, completions, e.log_samples)
  row = dict(step=step, **{f'task_{k}': v for k, v in result.items()})
  writer.write(dict(row, task_samples=samples) if samples else row)
  for i, sample in enumerate(samples):
    writer.write_text(f'samples/{i}', f'{sample["prompt"]}**{sample["completion"]}**\n\n(reference: '
                      f'{sample["reference"]})', step)
  return row
