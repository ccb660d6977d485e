"""Supervised fine-tuning data: JSONL instruction records, a chat template, loss on responses only, packing.

Records (one JSON object per line of the files matched by config.data.paths; blank lines are skipped), or, with
data.source=sft_stdlib, records made from the embedded corpus with no file at all (`stdlib_records`: six lines of a
stdlib file as the user turn, the next three as the answer; for the tiny preset and tests):

  {"prompt": "...", "response": "..."}                        one user turn and its answer
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   a chat; >= 1 assistant turn

Template. When the tokenizer ships a chat template (Jinja, in its tokenizer_config.json or chat_template.jinja:
Llama 3, Qwen2, Mistral instruct releases), records are rendered with it and the loss covers exactly the
assistant turns as it renders them, end-of-turn tokens included (llm_jax.data.chat_template). Otherwise the
built-in template ('simple') is used. A prompt/response record is the chat [user: prompt, assistant: response]. A chat is the
concatenation, for each message, of

  encode("<|{role}|>\\n")  encode(content)  END

where END is EOS after an assistant message and encode("\\n") after any other. Each part is encoded on its own,
so the prompt/response boundary is exact. Loss (`loss_mask`): only on the tokens of assistant contents and the
EOS that ends them; the model learns to answer and to stop, never to predict prompts or headers.
`encode_prompt(tokenizer, prompt)` gives the tokens a generation starts from (the prompt and the assistant
header), so greedy decoding of a fine-tuned model continues with the answer.

Truncation (config.data.sft_truncation) of a record with more than seq_len+1 tokens:
  truncate  drop tokens from the start (the oldest context: system/user text) until it fits, keeping at least
            one token before the first loss token; if the answers alone are longer than that, keep one context
            token and the first seq_len tokens of the answers (the end of the answer and its EOS are lost).
  drop      skip the record (counted in `SFTData.stats`).
  error     raise, naming file:line.

Packing: an example of n tokens becomes n-1 (input, target) pairs, never crossing into another example. The
records of an epoch are visited in the order `default_rng([seed, split_id, epoch]).permutation(N)` and packed
greedily into rows of seq_len: an example that does not fit in the current row starts the next one; the rest of
a row is padding (pad id, segment 0, loss 0). Segment ids number the examples of a row from 1 (document
masking in attention) and positions restart at 0 for each. Rows of all epochs form one sequence, and global
batch k is rows [k*B, (k+1)*B) of it (process p of P takes its B/P), so batch k is a pure function of (seed, k).

Tokenizer: config.data.tokenizer_path, else <workdir>/tokenizer.model or tokenizer.json (e.g. from convert or an
earlier run), else the same in <config.train.init_from> (the pre-training run being fine-tuned). `prepare` binds it to
the workdir. Errors a user can cause are `SFTDataError`s naming the field, or file:line and the reason.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import threading
from typing import Iterator, Sequence

import numpy as np

from llm_jax import storage
from llm_jax.errors import ConfigError
from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import UserError
from llm_jax.data import chat_template

ROLES = ('system', 'user', 'assistant')
_SPLIT_IDS = {'train': 0, 'validation': 1}
_BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


class SFTDataError(UserError, ValueError):
  """A record, file or field of the SFT source is unusable; the message names it (file:line: reason)."""


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray  # int32 [n]
  loss: np.ndarray  # bool [n]: token j is a target that counts (assistant content or its EOS)
  where: str  # 'file:line'


# --- records -------------------------------------------------------------------------------------------------------

def parse_record(line: str, where: str) -> list[dict]:
  """The messages of one JSONL line, validated; raises SFTDataError('file:line: reason')."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise SFTDataError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(record, dict):
    raise SFTDataError(f'{where}: expected a JSON object with "prompt" and "response", or "messages"; '
                       f'got {type(record).__name__}')
  if 'messages' in record:
    messages = record['messages']
    if not isinstance(messages, list) or not messages:
      raise SFTDataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, message in enumerate(messages):
      if not isinstance(message, dict) or 'role' not in message or 'content' not in message:
        raise SFTDataError(f'{where}: messages[{i}] must be an object with "role" and "content"')
      if message['role'] not in ROLES:
        raise SFTDataError(f'{where}: messages[{i}] has role {message["role"]!r}; expected one of '
                           f'{", ".join(ROLES)}')
      if not isinstance(message['content'], str):
        raise SFTDataError(f'{where}: messages[{i}].content must be a string')
      if message['role'] == 'assistant' and not message['content'].strip():
        raise SFTDataError(f'{where}: messages[{i}] is an empty assistant response')
    if not any(m['role'] == 'assistant' for m in messages):
      raise SFTDataError(f'{where}: no assistant message, so nothing to learn')
    return messages
  for field in ('prompt', 'response'):
    if field not in record:
      raise SFTDataError(f'{where}: missing field "{field}" (a record has "prompt" and "response", or '
                         f'"messages")')
    if not isinstance(record[field], str):
      raise SFTDataError(f'{where}: field "{field}" must be a string, got {type(record[field]).__name__}')
  if not record['response'].strip():
    raise SFTDataError(f'{where}: empty response')
  return [dict(role='user', content=record['prompt']), dict(role='assistant', content=record['response'])]


def render(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
  """Tokens of a chat under the tokenizer's own chat template when it has one (llm_jax.data.chat_template: loss
  on the assistant spans as rendered), else the built-in template above; and which of them count in the loss."""
  if getattr(tokenizer, 'chat_template', None):
    return chat_template.tokens_and_loss(tokenizer, messages)
  tokens, loss = [], []

  def add(ids, counts):
    tokens.extend(ids)
    loss.extend([counts] * len(ids))

  add(getattr(tokenizer, 'input_prefix', ()), False)  # BOS where the tokenizer adds one (a chat template writes its own)

  for message in messages:
    is_answer = message['role'] == 'assistant'
    add(tokenizer.encode(f'<|{message["role"]}|>\n'), False)
    add(tokenizer.encode(message['content']), is_answer)
    add([tokenizer.eos_id] if is_answer else tokenizer.encode('\n'), is_answer)
  return tokens, loss


def encode_prompt(tokenizer, prompt: str) -> list[int]:
  """Tokens a generation starts from for a single-turn prompt: user turn + assistant header (the tokenizer's chat
  template when it has one)."""
  return encode_chat_prompt(tokenizer, [dict(role='user', content=prompt)])


def encode_chat_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
  """Tokens a generation starts from for a conversation (the OpenAI server's chat endpoint): the messages and the
  assistant header, under the tokenizer's chat template when it has one, else the built-in template."""
  if getattr(tokenizer, 'chat_template', None):
    return chat_template.prompt_tokens(tokenizer, messages)
  tokens, _ = render(tokenizer, messages)
  return tokens + tokenizer.encode('<|assistant|>\n')


TRUNCATIONS = ('truncate', 'drop', 'error')  # config.data.sft_truncation: the policies `fit` implements


def fit(tokens: np.ndarray, loss: np.ndarray, max_tokens: int, policy: str, where: str):
  """(tokens, loss) of at most `max_tokens` under the truncation policy, or None when dropped."""
  if tokens.size <= max_tokens:
    return tokens, loss
  if policy == 'error':
    raise SFTDataError(f'{where}: {tokens.size} tokens, more than seq_len+1 = {max_tokens} '
                       f'(config.data.sft_truncation=error)')
  if policy == 'drop':
    return None
  first_loss = int(np.argmax(loss))
  cut = tokens.size - max_tokens
  if cut <= first_loss - 1:  # drop the oldest context only
    return tokens[cut:], loss[cut:]
  keep = slice(first_loss - 1, first_loss - 1 + max_tokens)  # one context token + the head of the answers
  return tokens[keep], loss[keep]


def jsonl_lines(path: str):
  """(line, 'path:number') of every non-blank line of a JSONL file: what SFT and preference records are read
  from, with the place an error message names."""
  with open(path, encoding='utf-8', errors='replace') as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        yield line, f'{path}:{number}'


def jsonl_files(globs: str, field: str) -> list[str]:
  patterns = [p.strip() for p in globs.split(',') if p.strip()]
  if not patterns:
    raise SFTDataError(f'config.{field}: no files given (comma-separated globs of .jsonl files)')
  files = []
  for pattern in patterns:
    matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matched:
      raise SFTDataError(f'config.{field}: {pattern!r} matches no file')
    files += [f for f in matched if os.path.isfile(f)]
  return sorted(dict.fromkeys(files))


def read_examples(files: Sequence[str], tokenizer, seq_len: int, policy: str) -> tuple[list[Example], dict]:
  """Every record of `files`, rendered and fitted to seq_len+1 tokens; stats count truncated/dropped ones."""
  records = ((parse_record(line, where), where) for path in files for line, where in jsonl_lines(path))
  return examples_of(records, tokenizer, seq_len, policy, f'config.data.paths: no usable records in {", ".join(files)}')


def examples_of(records, tokenizer, seq_len: int, policy: str, none_message: str) -> tuple[list[Example], dict]:
  """(messages, 'where') records rendered and fitted to seq_len+1 tokens; stats count truncated/dropped ones."""
  examples, stats = [], dict(records=0, truncated=0, dropped=0)
  for messages, where in records:
    try:
      tokens, loss = render(tokenizer, messages)
    except UserError as e:  # a chat template that cannot render this record
      raise SFTDataError(f'{where}: {e}') from None
    tokens, loss = np.asarray(tokens, np.int32), np.asarray(loss, bool)
    stats['records'] += 1
    fitted = fit(tokens, loss, seq_len + 1, policy, where)
    if fitted is None:
      stats['dropped'] += 1
      continue
    stats['truncated'] += int(fitted[0].size < tokens.size)
    examples.append(Example(fitted[0], fitted[1], where))
  if not examples:
    raise SFTDataError(f'{none_message} ({stats})')
  return examples, stats


STDLIB_PROMPT_LINES, STDLIB_ANSWER_LINES = 6, 3  # sft_stdlib: a window of nine non-blank lines of code


def stdlib_records(max_records: int = 0):
  """(messages, 'stdlib/<file>:<line>') made from the embedded corpus (the interpreter's stdlib, as the stdlib
  text source): in each window of nine non-blank lines of a file, the first six are the user turn and the next
  three the answer (the windows of preference_stdlib, whose chosen completion this answer is); at most
  `max_records` (0 = all)."""
  made = 0
  for key, start, window in sources.stdlib_line_windows(STDLIB_PROMPT_LINES + STDLIB_ANSWER_LINES):
    yield ([dict(role='user', content='\n'.join(window[:STDLIB_PROMPT_LINES])),
            dict(role='assistant', content='\n'.join(window[STDLIB_PROMPT_LINES:]))], f'stdlib/{key}:{start + 1}')
    made += 1
    if max_records and made >= max_records:
      return


# --- tokenizer -----------------------------------------------------------------------------------------------------

def tokenizer_path(config, workdir: str | None) -> str:
  """config.data.tokenizer_path, else the workdir's tokenizer, else the init_from workdir's."""
  if config.data.tokenizer_path:
    if not storage.exists(config.data.tokenizer_path):
      raise SFTDataError(f'config.data.tokenizer_path: {config.data.tokenizer_path} does not exist')
    return config.data.tokenizer_path
  for directory in (workdir, config.train.init_from):
    found = tokenizer_lib.workdir_tokenizer(directory)
    if found:
      return found
  raise SFTDataError('config.data.tokenizer_path: sft_jsonl needs a tokenizer: set it, or fine-tune in a workdir '
                     'that has tokenizer.model or tokenizer.json, or set config.train.init_from to one')


# --- packing -------------------------------------------------------------------------------------------------------

def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Greedy packing, in the given order, into rows of seq_len (see the module docstring)."""
  rows: list[list[Example]] = [[]]
  used = 0
  for example in examples:
    n = example.tokens.size - 1
    if used + n > seq_len and rows[-1]:
      rows.append([])
      used = 0
    rows[-1].append(example)
    used += n
  out = {k: np.zeros((len(rows), seq_len), np.float32 if k == 'loss_mask' else np.int32) for k in _BATCH_KEYS}
  out['inputs'][:] = pad_id
  out['targets'][:] = pad_id
  for r, row in enumerate(rows):
    start = 0
    for segment, example in enumerate(row, 1):
      n = example.tokens.size - 1
      span = slice(start, start + n)
      out['inputs'][r, span] = example.tokens[:-1]
      out['targets'][r, span] = example.tokens[1:]
      out['segment_ids'][r, span] = segment
      out['positions'][r, span] = np.arange(n)
      out['loss_mask'][r, span] = example.loss[1:]
      start += n
  return out


class SFTData:
  """A split's examples and its rows, addressed as a pure function of (seed, row index)."""

  def __init__(self, examples: list[Example], seq_len: int, global_batch_size: int, seed: int, split_id: int,
               pad_id: int, stats: dict | None = None):
    self.examples, self.seq_len, self.global_batch_size = examples, seq_len, global_batch_size
    self.seed, self.split_id, self.pad_id = seed, split_id, pad_id
    self.stats = stats or {}
    self._epochs: list[dict[str, np.ndarray]] = []  # packed rows of epochs 0, 1, ... (built on demand)
    self._first_row = [0]  # global index of each epoch's first row
    self._lock = threading.Lock()

  def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng([self.seed, self.split_id, epoch]).permutation(len(self.examples))
    return pack([self.examples[i] for i in order], self.seq_len, self.pad_id)

  def _row(self, index: int) -> tuple[dict[str, np.ndarray], int]:
    while self._first_row[-1] <= index:  # epochs are small (an SFT set): keep them
      rows = self.epoch_rows(len(self._epochs))
      self._epochs.append(rows)
      self._first_row.append(self._first_row[-1] + rows['inputs'].shape[0])
    epoch = int(np.searchsorted(self._first_row, index, side='right')) - 1
    return self._epochs[epoch], index - self._first_row[epoch]

  def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    per_process = self.global_batch_size // process_count
    first = step * self.global_batch_size + process_index * per_process
    with self._lock:
      picked = [self._row(i) for i in range(first, first + per_process)]
    return {k: np.stack([rows[k][r] for rows, r in picked]) for k in picked[0][0]}  # the keys the rows have


# --- the source interface (llm_jax.data registry) -----------------------------------------------------------------

_CACHE: dict[tuple, tuple[list[Example], dict]] = {}


def _split_id(config, split: str) -> int:
  if split in ('train', config.data.train_split):
    return _SPLIT_IDS['train']
  if split in ('validation', 'eval', config.data.eval_split):
    return _SPLIT_IDS['validation']
  raise ConfigError(f'unknown split {split!r}; expected train or validation')


def _split_files(config, split: str) -> tuple[list[str], int]:
  if split in ('train', config.data.train_split):
    return jsonl_files(config.data.paths, 'data.paths'), _SPLIT_IDS['train']
  if split in ('validation', 'eval', config.data.eval_split):
    if config.data.sft_eval_paths:
      return jsonl_files(config.data.sft_eval_paths, 'data.sft_eval_paths'), _SPLIT_IDS['validation']
    return jsonl_files(config.data.paths, 'data.paths'), _SPLIT_IDS['validation']
  raise ConfigError(f'unknown split {split!r}; expected train or validation')


def load_examples(config, split: str, tokenizer) -> tuple[list[Example], dict]:
  """The split's examples, cached per (files and their mtimes, tokenizer, seq_len, truncation policy)."""
  if config.data.source == 'sft_stdlib':  # a held-out share of the windows (data.validation_fraction, by key)
    role = 'train' if _split_id(config, split) == _SPLIT_IDS['train'] else 'validation'
    key = ('stdlib', role, config.data.max_docs, config.data.validation_fraction, tokenizer.fingerprint,
           config.data.seq_len, config.data.sft_truncation)
    if key not in _CACHE:
      records = ((m, w) for m, w in stdlib_records(config.data.max_docs)
                 if sources.role_of(w, config.data.validation_fraction) == role)
      _CACHE[key] = examples_of(records, tokenizer, config.data.seq_len, config.data.sft_truncation,
                                f'config.data.max_docs: no {role} records among the stdlib windows')
    return _CACHE[key]
  files, _ = _split_files(config, split)
  key = (tuple((f, os.path.getmtime(f), os.path.getsize(f)) for f in files), tokenizer.fingerprint,
         tokenizer.input_prefix,
         config.data.seq_len, config.data.sft_truncation)
  if key not in _CACHE:
    _CACHE[key] = read_examples(files, tokenizer, config.data.seq_len, config.data.sft_truncation)
  return _CACHE[key]


def _tokenizer(config, workdir):
  tokenizer = tokenizer_lib.load(tokenizer_path(config, workdir), config.data.add_bos)
  tokenizer_lib.check_vocab(config, tokenizer)
  if tokenizer.eos_id < 0:
    raise SFTDataError(f'config.data.tokenizer_path: {tokenizer.path} has no EOS piece; responses end with EOS')
  return tokenizer


def prepare(config, workdir: str | None = None) -> None:
  """Checks every record (errors name file:line) and binds the tokenizer to the workdir."""
  tokenizer = _tokenizer(config, workdir)
  for split in ('train', 'validation'):
    load_examples(config, split, tokenizer)
  if workdir:  # only once the data is known to be good
    tokenizer_lib.bind_to_workdir(tokenizer.path, workdir)


def open_split(config, split: str = 'train', workdir: str | None = None) -> SFTData:
  tokenizer = _tokenizer(config, workdir)
  examples, stats = load_examples(config, split, tokenizer)
  split_id = _split_id(config, split)
  pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
  return SFTData(examples, config.data.seq_len, config.data.global_batch_size, config.data.seed, split_id, pad_id,
                 stats)


def make_iterator(config, split: str = 'train', start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, workdir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Batches start_step, start_step+1, ... of `split` (this process's rows), endless. No TensorFlow."""
  split_data = open_split(config, split, workdir)
  step = start_step
  while True:
    yield split_data.batch(step, process_index, process_count)
    step += 1
