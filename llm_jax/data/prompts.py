"""Prompts as data, for learning from rewards (model.objective=grpo; the rollout stage, llm_jax.rollout, samples the
completions): data.source=prompts_jsonl (JSONL records of data.paths) or prompts_hf (rows of a Hugging Face dataset,
data.hf_path), with data.prompt_columns mapping the record's columns onto ours ('prompt=question,answer=answer',
GSM8K-style).

A record has a `prompt`, a text or a list of chat messages ({"role", "content"}); every other field (after the
mapping: the mapped names) is passed to the reward functions as it is (llm_jax.rewards). A text prompt is encoded as
a model input (BOS where the tokenizer adds one, data.add_bos), chat messages through the tokenizer's chat template
with the assistant header (as the OpenAI server's chat endpoint). A prompt longer than data.seq_len -
grpo.max_completion_tokens tokens is one error naming the record.

Splits: prompts_jsonl holds out data.validation_fraction of the records by a stable hash of file:line (as the other
JSONL sources); prompts_hf reads data.train_split and data.eval_split when the dataset has both, else holds out the
same share. Rollout r of a run takes prompts r * grpo.prompts_per_rollout ... of the split's records visited in a
permutation of (data.seed, epoch): a pure function of (seed, r), so a resumed run sees the same prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np

from llm_jax.data import hf_source, sft, sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import ConfigError, UserError, fail


class PromptDataError(UserError, ValueError):
  """A prompt record that cannot be used; the message names the file and line (or dataset row)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  ids: tuple[int, ...]  # the prompt's tokens as the model reads them
  text: Any  # the record's prompt (a text or chat messages), as the reward functions get it
  fields: dict  # the record's other fields (answer, ...)
  where: str  # file:line or dataset[split][row]


def parse_columns(spec: str) -> dict[str, str]:
  """config.data.prompt_columns as {our field: the record's column}; ConfigError naming the field."""
  columns: dict[str, str] = {}
  for item in filter(None, (part.strip() for part in spec.split(','))):
    ours, sep, theirs = (part.strip() for part in item.partition('='))
    if not sep or not ours or not theirs:
      fail('data.prompt_columns', f'{item!r} is not field=column')
    if ours in columns:
      fail('data.prompt_columns', f'maps "{ours}" twice')
    columns[ours] = theirs
  return columns


def _renamed(record, columns: dict[str, str], where: str) -> dict:
  if not isinstance(record, dict):
    raise PromptDataError(f'{where}: expected an object with a "prompt"; got {type(record).__name__}')
  mapped = set(columns.values())
  out = {k: v for k, v in record.items() if k not in mapped}
  for ours, theirs in columns.items():
    if theirs not in record:
      raise PromptDataError(f'{where}: no column "{theirs}" (data.prompt_columns maps {ours}={theirs}); the record '
                            f'has {", ".join(map(str, record)) or "none"}')
    out[ours] = record[theirs]
  if 'prompt' not in out:
    raise PromptDataError(f'{where}: no "prompt" field (map one with data.prompt_columns=prompt=<column>); the '
                          f'record has {", ".join(map(str, record)) or "none"}')
  return out


def encode(tokenizer, prompt, where: str) -> list[int]:
  """The prompt's tokens: a text as a model input, chat messages through the chat template (module docstring)."""
  if isinstance(prompt, str):
    if not prompt:
      raise PromptDataError(f'{where}: empty "prompt"')
    return list(tokenizer.encode_prompt(prompt))
  if (not isinstance(prompt, list) or not prompt or
      not all(isinstance(m, dict) and 'role' in m and isinstance(m.get('content'), str) for m in prompt)):
    raise PromptDataError(f'{where}: "prompt" must be a text or a non-empty list of {{"role", "content"}} messages')
  try:
    return list(sft.encode_chat_prompt(tokenizer, prompt))
  except UserError as e:
    raise PromptDataError(f'{where}: {e}') from None


def max_prompt_tokens(config) -> int:
  return config.data.seq_len - config.grpo.max_completion_tokens


def _records(config) -> Iterator[tuple[Any, str, str]]:
  """(record, where, role) of the source; role '' = held out by hash."""
  d = config.data
  if d.source == 'prompts_jsonl':
    for path in sft.jsonl_files(d.paths, 'data.paths'):
      for line, where in sft.jsonl_lines(path):
        try:
          yield json.loads(line), where, ''
        except json.JSONDecodeError as e:
          raise PromptDataError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from None
    return
  loaded = hf_source.load(config)
  for split, role in hf_source.splits(config):
    for row, record in enumerate(loaded[split]):
      yield dict(record), f'{d.hf_path}[{split}][{row}]', role


def read_prompts(config, tokenizer) -> dict[str, list[Prompt]]:
  """{'train': [...], 'validation': [...]} of the source's records (module docstring)."""
  columns = parse_columns(config.data.prompt_columns)
  limit = max_prompt_tokens(config)
  out: dict[str, list[Prompt]] = {'train': [], 'validation': []}
  for record, where, role in _records(config):
    record = _renamed(record, columns, where)
    ids = encode(tokenizer, record['prompt'], where)
    if len(ids) > limit:
      raise PromptDataError(f'{where}: the prompt has {len(ids)} tokens; data.seq_len={config.data.seq_len} - '
                            f'grpo.max_completion_tokens={config.grpo.max_completion_tokens} leaves {limit}')
    role = role or sources.role_of(where, config.data.validation_fraction)
    fields = {k: v for k, v in record.items() if k != 'prompt'}
    out[role].append(Prompt(tuple(ids), record['prompt'], fields, where))
  if not out['train']:
    raise PromptDataError(f'data.paths / data.hf_path: no training prompts in {config.data.paths or config.data.hf_path}')
  return out


_CACHE: dict = {}


def _input_key(config) -> tuple:
  d = config.data
  if d.source == 'prompts_jsonl':
    files = sft.jsonl_files(d.paths, 'data.paths')
    return tuple((f, os.path.getmtime(f), os.path.getsize(f)) for f in files)
  return (d.hf_path, d.hf_name, d.hf_data_files, d.train_split, d.eval_split)


def tokenizer_of(config, workdir):
  tokenizer = tokenizer_lib.load(sft.tokenizer_path(config, workdir), config.data.add_bos)
  tokenizer_lib.check_vocab(config, tokenizer)
  return tokenizer


def load(config, workdir: str | None = None):
  """(tokenizer, prompts by split), cached per (inputs, columns, tokenizer and its BOS, lengths, validation share)."""
  tokenizer = tokenizer_of(config, workdir)
  key = (config.data.source, _input_key(config), config.data.prompt_columns, tokenizer.fingerprint,
         tokenizer.input_prefix, config.data.seq_len, config.grpo.max_completion_tokens,
         config.data.validation_fraction)
  if key not in _CACHE:
    _CACHE[key] = read_prompts(config, tokenizer)
  return tokenizer, _CACHE[key]


def batch_indices(count: int, size: int, seed: int, index: int) -> list[int]:
  """Records of batch `index` of `size` prompts: a walk through permutations of (seed, epoch) of `count` records."""
  out = []
  for k in range(index * size, (index + 1) * size):
    epoch, position = divmod(k, count)
    out.append(int(np.random.default_rng([seed, epoch]).permutation(count)[position]))
  return out


def prepare(config, workdir: str | None = None) -> None:
  """Checks every record (errors name file:line), prints the counts and binds the tokenizer to the workdir."""
  tokenizer, prompts = load(config, workdir)
  print(f'prompts: {len(prompts["train"])} train, {len(prompts["validation"])} validation', flush=True)
  if workdir:
    tokenizer_lib.bind_to_workdir(tokenizer.path, workdir)


def make_iterator(config, split='train', start_step=0, process_index=0, process_count=1, workdir=None):
  raise ConfigError(f'config.data.source={config.data.source}: prompts are not token batches; model.objective=grpo '
                    f'samples its batches from them (llm_jax.rollout)')
