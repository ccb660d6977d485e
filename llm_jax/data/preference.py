"""Preference pairs (config.data.source = preference_jsonl, preference_hf or preference_stdlib), for
model.objective=dpo. preference_stdlib makes pairs from the embedded corpus (`_stdlib_records`), for the tiny
preset and tests.

Records, one JSON object a line of the files of config.data.paths, or one row of the Hugging Face dataset
config.data.hf_path, in the formats TRL reads (its `maybe_extract_prompt` decides the prompt, and so do we):

  {"prompt": "...", "chosen": "...", "rejected": "..."}                                    plain text
  {"prompt": [{"role": "user", "content": "..."}, ...],
   "chosen": [{"role": "assistant", "content": "..."}], "rejected": [{"role": "assistant", ...}]}   chat
  {"chosen": ..., "rejected": ...}            implicit prompt: each a whole text or conversation
  {"prompt": "...", "chosen": [messages], "rejected": [messages]}   text prompt, conversations

Without a prompt of the completions' kind (none, or text beside conversations), the prompt is the longest
common prefix of chosen and rejected (messages of a chat, characters of a text, a space before the split going to
the completions), exactly as TRL's `extract_prompt`. One step further than TRL: when a text prompt stands beside
conversations that share no prefix, it is the user message before them (TRL would keep an empty prompt).
A chat completion starts with an assistant message. config.data.preference_columns maps other column names
("prompt=question,chosen=response_j,rejected=response_k").

Tokens. Plain text: the prompt and each completion are encoded on their own, the prompt after BOS where the
tokenizer adds one (`encode_prompt`, config.data.add_bos) and EOS ends each completion (as TRL adds them). Chat:
prompt + completion is rendered as one conversation by the tokenizer's chat template (or the built-in template of
llm_jax.data.sft), and the completion is its span from the first to the last assistant token with the
end-of-turn token; the prompt is everything before it (so it ends with the assistant header).

Length, per sequence as TRL's max_length: prompt + chosen and prompt + rejected each have at most
L = config.dpo.max_length tokens (0 = data.seq_len // 2 + 1, the most two sequences of a row can have: a sequence
of n tokens gives n-1 targets; and at most model.max_seq_len, which bounds one sequence, not the row of pairs,
since positions restart at 0 for each sequence). A longer pair is truncated in the order of TRL's
`max_prompt_length`: first the prompt keeps its last config.dpo.max_prompt_length tokens (0 = L // 2), then, if
still too long, each completion keeps its first L - prompt tokens. Pairs whose prompt or completions were cut are counted (stats, printed by
prepare).

Rows. Pairs are packed greedily into rows of seq_len in the order `default_rng([seed, split_id, epoch])
.permutation(N)`; pair k of a row is segments 2k-1 (chosen) and 2k (rejected), positions restart at 0 for each
sequence, the rest of a row is padding (segment 0). `loss_mask` is 1 on the targets that are completion tokens:
the prompt is masked out of the log-probabilities. Global batch k is rows [k*B, (k+1)*B) of the epochs' rows, a
pure function of (seed, k) (llm_jax.data.sft.SFTData, whose machinery this reuses).

Splits: a dataset's given eval split, else a held-out share of pairs (config.data.validation_fraction) chosen by
a stable hash of each pair's key (file:line, or split:row): a pair is never split. `open_split(...,
with_reference=True)` adds `ref_chosen` and `ref_rejected` [B, T//2] to each batch (slot k: pair k of the row, as
llm_jax.objectives.preference.pair_sums lays them out): the reference's summed completion log-probs of each pair,
two numbers per pair, read for the batch's pairs from <prepared dir>/reference_logps/<split>-<key>.npy (float32
[pairs, 2], memory-mapped where local), which `store_reference` writes in one pass before training
(make_iterator adds them whenever config.dpo.precompute_ref applies).

Errors a user can cause are `PreferenceDataError`s naming file:line (or dataset row) and the reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Iterator, Sequence

import numpy as np

from llm_jax import storage
from llm_jax.errors import ConfigError, fail
from llm_jax.data import sft
from llm_jax.data import sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.errors import UserError
from llm_jax.data import hf_source

_SPLIT_IDS = {'train': 0, 'validation': 1}
FIELDS = ('prompt', 'chosen', 'rejected')


class PreferenceDataError(UserError, ValueError):
  """A record, file or field of a preference source is unusable; the message names it (file:line: reason)."""


class Pair:
  """The token sequences of one pair: prompt + chosen and prompt + rejected, with their completion masks.
  `truncated`: '' (whole), or what fit() cut: 'prompt', 'completion' or 'prompt+completion'."""

  def __init__(self, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, where: str, truncated: str):
    self.prompt, self.chosen, self.rejected, self.where, self.truncated = prompt, chosen, rejected, where, truncated

  def sequences(self) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(tokens, is completion)] of the chosen and the rejected sequence."""
    return [(np.concatenate([self.prompt, c]), np.concatenate([np.zeros(self.prompt.size, bool),
                                                               np.ones(c.size, bool)]))
            for c in (self.chosen, self.rejected)]

  @property
  def positions(self) -> int:  # row positions the pair takes (n-1 per sequence)
    return 2 * self.prompt.size + self.chosen.size + self.rejected.size - 2


# --- records -------------------------------------------------------------------------------------------------------

def parse_columns(spec: str) -> dict[str, str]:
  """config.data.preference_columns as {our field: the record's column}; ConfigError naming the field."""
  columns: dict[str, str] = {}
  for item in filter(None, (part.strip() for part in spec.split(','))):
    ours, sep, theirs = (part.strip() for part in item.partition('='))
    if not sep or ours not in FIELDS or not theirs:
      fail('data.preference_columns', f'{item!r} is not field=column with field one of {", ".join(FIELDS)}')
    if ours in columns:
      fail('data.preference_columns', f'maps "{ours}" twice')
    columns[ours] = theirs
  return columns


def _renamed(record: dict, columns: dict[str, str], where: str) -> dict:
  """The record with config.data.preference_columns applied: our field names, the mapped columns' values."""
  out = {field: record[field] for field in FIELDS if field in record and field not in columns}
  for ours, theirs in columns.items():
    if theirs not in record:
      raise PreferenceDataError(f'{where}: no column "{theirs}" (data.preference_columns maps {ours}={theirs}); '
                                f'the record has {", ".join(map(str, record)) or "none"}')
    out[ours] = record[theirs]
  return out


def is_chat(value) -> bool:
  """A list of messages (TRL's `is_conversational`: the first item is an object with "role" and "content")."""
  return (isinstance(value, list) and bool(value) and isinstance(value[0], dict) and 'role' in value[0]
          and 'content' in value[0])


def extract_prompt(chosen, rejected):
  """(prompt, chosen, rejected) of an implicit-prompt pair, as TRL's `extract_prompt`: the prompt is the longest
  common prefix of the two (messages of a conversation, characters of a text; a space just before the split goes
  to the completions). When one is a prefix of the other, TRL's loop ends one item short of it; so do we."""
  idx = 0
  for idx in range(min(len(chosen), len(rejected))):
    if chosen[idx] != rejected[idx]:
      if idx > 0 and chosen[idx - 1] == ' ':  # TRL checks idx - 1 even at 0 (the last character): not copied
        idx -= 1
      break
  return chosen[:idx], chosen[idx:], rejected[idx:]


def normalize(record, where: str, columns: dict[str, str] | None = None) -> dict:
  """The record's prompt/chosen/rejected (module docstring): column mapping, then TRL's `maybe_extract_prompt`:
  a prompt of the completions' kind is kept, else the prompt is extracted from the two completions."""
  if not isinstance(record, dict):
    raise PreferenceDataError(f'{where}: expected an object with "chosen" and "rejected" (and "prompt"); got '
                              f'{type(record).__name__}')
  record = _renamed(record, columns or {}, where)
  for field in ('chosen', 'rejected'):
    if field not in record:
      raise PreferenceDataError(f'{where}: missing field "{field}" (a pair has "chosen" and "rejected", and a '
                                f'"prompt" unless they both begin with it)')
  chosen, rejected = record['chosen'], record['rejected']
  if 'prompt' in record and is_chat(record['prompt']) == is_chat(chosen):
    return {field: record[field] for field in FIELDS}
  if is_chat(chosen) != is_chat(rejected) or not isinstance(chosen, (str, list)) or not isinstance(
      rejected, (str, list)):
    raise PreferenceDataError(f'{where}: "chosen" and "rejected" must both be texts or both lists of messages to '
                              f'take the prompt from their common beginning (the record has '
                              f'{"no prompt" if "prompt" not in record else "a prompt of another kind"})')
  if chosen == rejected:
    raise PreferenceDataError(f'{where}: "chosen" and "rejected" are the same')
  prompt, chosen, rejected = extract_prompt(chosen, rejected)
  if not prompt and isinstance(record.get('prompt'), str) and is_chat(chosen):
    prompt = [dict(role='user', content=record['prompt'])]  # a text prompt before assistant-only conversations
  if not prompt:
    raise PreferenceDataError(f'{where}: no prompt: the record has none of the completions\' kind, and "chosen" '
                              f'and "rejected" differ from their first {"message" if is_chat(chosen) else "character"}')
  return dict(prompt=prompt, chosen=chosen, rejected=rejected)


def _check_messages(value, field: str, where: str, completion: bool) -> list[dict]:
  if not isinstance(value, list) or not value:
    raise PreferenceDataError(f'{where}: "{field}" must be a string or a non-empty list of {{"role", "content"}}')
  for i, message in enumerate(value):
    if not isinstance(message, dict) or not isinstance(message.get('content'), str) or 'role' not in message:
      raise PreferenceDataError(f'{where}: {field}[{i}] must be an object with "role" and a string "content"')
    if message['role'] not in sft.ROLES:
      raise PreferenceDataError(f'{where}: {field}[{i}] has role {message["role"]!r}; expected one of '
                                f'{", ".join(sft.ROLES)}')
  if completion and value[0]['role'] != 'assistant':
    raise PreferenceDataError(f'{where}: "{field}" must start with an assistant message (got '
                              f'{value[0]["role"]!r})')
  return value


def parse_record(record, where: str, columns: dict[str, str] | None = None) -> dict:
  """The validated prompt/chosen/rejected of one record (strings, or message lists for a chat)."""
  record = normalize(record, where, columns)
  chat = not isinstance(record['prompt'], str)
  for field in FIELDS:
    value = record[field]
    if chat:
      _check_messages(value, field, where, completion=field != 'prompt')
    elif not isinstance(value, str):
      raise PreferenceDataError(f'{where}: field "{field}" must be a string like "prompt" (plain text), got '
                                f'{type(value).__name__}')
  text = lambda v: v if isinstance(v, str) else ''.join(m['content'] for m in v)
  for field in ('chosen', 'rejected'):
    if not text(record[field]).strip():
      raise PreferenceDataError(f'{where}: empty "{field}" completion')
  return record


def _chat_tokens(tokenizer, prompt: list, completion: list, where: str) -> tuple[list[int], list[int]]:
  """(prompt ids, completion ids) of a chat: the completion runs from its first assistant token (the first loss
  span after those of the prompt's own assistant turns) to the last one, as the template renders them."""
  try:
    tokens, loss = sft.render(tokenizer, list(prompt) + list(completion))
  except UserError as e:
    raise PreferenceDataError(f'{where}: {e}') from None
  starts = [i for i, counts in enumerate(loss) if counts and (i == 0 or not loss[i - 1])]  # each loss span's first
  earlier = sum(message['role'] == 'assistant' for message in prompt)
  if len(starts) <= earlier:
    raise PreferenceDataError(f'{where}: the chat template rendered no assistant tokens for the completion')
  first = starts[earlier]
  last = len(loss) - loss[::-1].index(True)
  return tokens[:first], tokens[first:last]


def tokenize(tokenizer, record: dict, where: str) -> tuple[list[int], list[int], list[int]]:
  """(prompt, chosen, rejected) token ids of a parsed record (module docstring)."""
  if isinstance(record['prompt'], str):
    encode = lambda text: list(tokenizer.encode(text))  # the prompt starts the input: BOS where the model expects it
    return tokenizer.encode_prompt(record['prompt']), encode(record['chosen']) + [tokenizer.eos_id], \
        encode(record['rejected']) + [tokenizer.eos_id]
  prompt, chosen = _chat_tokens(tokenizer, record['prompt'], record['chosen'], where)
  prompt_r, rejected = _chat_tokens(tokenizer, record['prompt'], record['rejected'], where)
  if prompt != prompt_r:
    raise PreferenceDataError(f'{where}: the chat template renders the prompt differently before "chosen" and '
                              f'"rejected"')
  return prompt, chosen, rejected


def lengths(config) -> tuple[int, int]:
  """(tokens of one sequence, prompt tokens kept when a sequence is too long): config.dpo.max_length and
  max_prompt_length with their defaults resolved; ConfigError naming the field when they cannot work."""
  seq_len, p, longest = config.data.seq_len, config.dpo, config.model.max_seq_len
  room = seq_len // 2 + 1  # two sequences of n tokens take 2(n-1) positions of a row
  if not 0 <= p.max_length <= min(room, longest):
    fail('dpo.max_length', f'must be in [0, {min(room, longest)}]: a row of data.seq_len={seq_len} holds a pair, two '
         f'sequences of at most {room} tokens, and model.max_seq_len={longest} (0 = the smaller), got {p.max_length}')
  max_length = p.max_length or min(room, longest)
  if p.max_prompt_length < 0 or p.max_prompt_length >= max_length:
    fail('dpo.max_prompt_length', f'must be in [0, dpo.max_length) = [0, {max_length}) (0 = {max_length // 2}), '
         f'got {p.max_prompt_length}')
  return max_length, p.max_prompt_length or max_length // 2


def fit(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt: int):
  """The pair cut so that prompt + each completion has at most max_length tokens, prompt first (its last
  max_prompt tokens), then the completions (their first max_length - prompt tokens): TRL's order. Returns
  (prompt, chosen, rejected, what was cut: '' | 'prompt' | 'completion' | 'prompt+completion')."""
  cut = []
  longest = max(len(chosen), len(rejected))
  if len(prompt) + longest > max_length and len(prompt) > max_prompt:
    prompt = prompt[-max_prompt:]
    cut.append('prompt')
  if len(prompt) + longest > max_length:
    cap = max_length - len(prompt)  # >= 1: max_prompt < max_length
    chosen, rejected = chosen[:cap], rejected[:cap]
    cut.append('completion')
  return prompt, chosen, rejected, '+'.join(cut)


def make_pair(tokenizer, record, where: str, max_length: int, max_prompt: int,
              columns: dict[str, str] | None = None) -> Pair:
  prompt, chosen, rejected = tokenize(tokenizer, parse_record(record, where, columns), where)
  if not prompt:
    raise PreferenceDataError(f'{where}: the prompt has no tokens (the first token of a sequence is never '
                              f'predicted, so the completion needs one before it)')
  prompt, chosen, rejected, cut = fit(prompt, chosen, rejected, max_length, max_prompt)
  as_array = lambda ids: np.asarray(ids, np.int32)
  return Pair(as_array(prompt), as_array(chosen), as_array(rejected), where, cut)


# --- reading -------------------------------------------------------------------------------------------------------

def _jsonl_records(config) -> Iterator[tuple[object, str]]:
  for path in sft.jsonl_files(config.data.paths, 'data.paths'):
    for line, where in sft.jsonl_lines(path):
      try:
        yield json.loads(line), where
      except json.JSONDecodeError as e:
        raise PreferenceDataError(f'{where}: not valid JSON ({e.msg} at column {e.colno})') from None


def _hf_records(config) -> Iterator[tuple[object, str, str]]:
  loaded = hf_source.load(config)
  for split, role in hf_source.splits(config):
    for row, record in enumerate(loaded[split]):
      yield record, f'{config.data.hf_path}[{split}][{row}]', role


STDLIB_PROMPT_LINES, STDLIB_COMPLETION_LINES = 6, 3  # a window of code: its head is the prompt, the rest the pair


def _swap_adjacent_words(line: str, rng) -> str:
  """`line` with one pair of neighbouring, different words swapped, among its first five words (so that it
  survives the truncation of long pairs); the same line when there is none."""
  words = line.split(' ')
  spots = [i for i in range(min(len(words) - 1, 4)) if words[i] and words[i + 1] and words[i] != words[i + 1]]
  if not spots:
    return line
  i = spots[int(rng.integers(len(spots)))]
  words[i], words[i + 1] = words[i + 1], words[i]
  return ' '.join(words)


def _stdlib_records(config) -> Iterator[tuple[object, str, str]]:
  """Pairs made from the embedded corpus (the interpreter's stdlib, as the stdlib text source): in each window
  of nine non-blank lines of a file, the first six are the prompt, the next three the chosen completion, and the
  same three lines lightly corrupted the rejected one: two neighbouring words of the first line that has them
  swapped (a seeded choice of each window's key), so that the two differ in a few tokens only."""
  made = 0
  for key, start, window in sources.stdlib_line_windows(STDLIB_PROMPT_LINES + STDLIB_COMPLETION_LINES):
    seed = int.from_bytes(hashlib.sha256(f'{key}:{start}'.encode()).digest()[:8], 'big')
    rng = np.random.default_rng(seed)
    chosen = window[STDLIB_PROMPT_LINES:]
    rejected = list(chosen)
    for i, line in enumerate(chosen):  # one swap, in the first line that has two words to swap
      rejected[i] = _swap_adjacent_words(line, rng)
      if rejected[i] != line:
        break
    else:
      continue
    yield (dict(prompt='\n'.join(window[:STDLIB_PROMPT_LINES]) + '\n', chosen='\n'.join(chosen),
                rejected='\n'.join(rejected)), f'stdlib/{key}:{start + 1}', '')
    made += 1
    if config.data.max_docs and made >= config.data.max_docs:
      return


def read_pairs(config, tokenizer) -> tuple[dict[str, list[Pair]], dict]:
  """{'train': pairs, 'validation': pairs} and counts (records, per split, truncated: all, prompt cut,
  completions cut)."""
  max_length, max_prompt = lengths(config)
  columns = parse_columns(config.data.preference_columns)
  if config.data.source == 'preference_jsonl':
    records = ((record, where, '') for record, where in _jsonl_records(config))
  elif config.data.source == 'preference_stdlib':
    records = _stdlib_records(config)
  else:
    records = _hf_records(config)
  rows = [(make_pair(tokenizer, record, where, max_length, max_prompt, columns), where, role)
          for record, where, role in records]
  split, held_out_tail = _split(rows, config.data.validation_fraction)
  every = [p for s in split.values() for p in s]
  stats = dict(records=len(every), truncated=sum(bool(p.truncated) for p in every),
               truncated_prompt=sum('prompt' in p.truncated for p in every),
               truncated_completion=sum('completion' in p.truncated for p in every),
               max_length=max_length, max_prompt_length=max_prompt,
               train=len(split['train']), validation=len(split['validation']), held_out_tail=held_out_tail)
  for role, pairs in split.items():
    if not pairs:
      field = 'data.validation_fraction' if role == 'validation' else 'data.paths'
      raise PreferenceDataError(f'config.{field}: no {role} pairs among the {stats["records"]} records')
  return split, stats


def _split(rows: list[tuple[Pair, str, str]], fraction: float) -> tuple[dict[str, list[Pair]], bool]:
  """{'train': pairs, 'validation': pairs} of (pair, where, the source's own role or ''): by the source's split, else
  by a hash of `where`. When hashing leaves either split empty (a handful of records), validation is instead the
  last `fraction` of the records (at least one, never all), as the pretraining preparation holds out the
  stream's tail: the split no longer depends on the luck of a few hashes (or of the directory's name). Returns
  whether it did so."""
  split = {'train': [], 'validation': []}
  for pair, where, role in rows:
    split[role or sources.role_of(where, fraction)].append(pair)
  given = any(role for _, _, role in rows)
  if given or fraction <= 0 or len(rows) < 2 or (split['train'] and split['validation']):
    return split, False
  held = min(len(rows) - 1, max(1, round(fraction * len(rows))))
  pairs = [pair for pair, _, _ in rows]
  return {'train': pairs[:-held], 'validation': pairs[-held:]}, True


def summary(stats: dict) -> str:
  """The prepare line: pairs per split, and how many were truncated and how."""
  tail = ' (the last records: hashing held out none)' if stats.get('held_out_tail') else ''
  return (f'preference pairs: {stats["train"]} train, {stats["validation"]} validation{tail}; {stats["truncated"]} of '
          f'{stats["records"]} truncated to dpo.max_length={stats["max_length"]} tokens a sequence '
          f'({stats["truncated_prompt"]} with the prompt cut to its last dpo.max_prompt_length='
          f'{stats["max_prompt_length"]} tokens, {stats["truncated_completion"]} with the completions cut)')


# --- rows ----------------------------------------------------------------------------------------------------------

def pack(pairs: Sequence[Pair], seq_len: int, pad_id: int, ids: Sequence[int] | None = None
         ) -> dict[str, np.ndarray]:
  """Greedy packing of whole pairs into rows of seq_len (module docstring). With `ids` (one per pair), also
  `pair_ids` [R, seq_len // 2]: slot k of a row holds the id of its pair k (the slots of
  llm_jax.objectives.preference.pair_sums), -1 where there is none."""
  rows: list[list[int]] = [[]]
  used = 0
  for i, pair in enumerate(pairs):
    if used + pair.positions > seq_len and rows[-1]:
      rows.append([])
      used = 0
    rows[-1].append(i)
    used += pair.positions
  keys = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')
  out = {k: np.zeros((len(rows), seq_len), np.float32 if k == 'loss_mask' else np.int32) for k in keys}
  out['inputs'][:] = pad_id
  out['targets'][:] = pad_id
  if ids is not None:
    out['pair_ids'] = np.full((len(rows), seq_len // 2), -1, np.int32)
  for r, row in enumerate(rows):
    start, segment = 0, 0
    for slot, i in enumerate(row):
      if ids is not None:
        out['pair_ids'][r, slot] = ids[i]
      for tokens, completion in pairs[i].sequences():
        n, segment = tokens.size - 1, segment + 1
        span = slice(start, start + n)
        out['inputs'][r, span] = tokens[:-1]
        out['targets'][r, span] = tokens[1:]
        out['segment_ids'][r, span] = segment
        out['positions'][r, span] = np.arange(n)
        out['loss_mask'][r, span] = completion[1:]
        start += n
  return out


class PreferenceData(sft.SFTData):
  """A split's pairs and their rows, addressed as a pure function of (seed, row index). With `reference` (the
  stored [pairs, 2] sums, store_reference) each batch gathers its pairs' two sums: ref_chosen, ref_rejected."""

  reference: np.ndarray | None = None

  def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng([self.seed, self.split_id, epoch]).permutation(len(self.examples))
    return pack([self.examples[i] for i in order], self.seq_len, self.pad_id, ids=order)

  def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    batch = super().batch(step, process_index, process_count)
    ids = batch.pop('pair_ids')
    if self.reference is not None:
      sums = np.asarray(self.reference[np.maximum(ids, 0)], np.float32)  # [B, P, 2]: read for these pairs only
      sums[ids < 0] = 0.0
      batch['ref_chosen'], batch['ref_rejected'] = sums[..., 0], sums[..., 1]
    return batch


# --- the source interface (llm_jax.data registry) -----------------------------------------------------------------

_CACHE: dict[tuple, tuple[dict[str, list[Pair]], dict]] = {}


def _role(config, split: str) -> str:
  if split in ('train', config.data.train_split):
    return 'train'
  if split in ('validation', 'eval', config.data.eval_split):
    return 'validation'
  raise ConfigError(f'unknown split {split!r}; expected train or validation')


def _input_key(config) -> tuple:
  d = config.data
  if d.source == 'preference_jsonl':
    files = sft.jsonl_files(d.paths, 'data.paths')
    return tuple((f, os.path.getmtime(f), os.path.getsize(f)) for f in files)
  if d.source == 'preference_stdlib':
    return (d.max_docs,)
  return (d.hf_path, d.hf_name, d.hf_data_files, d.train_split, d.eval_split)


def load_pairs(config, tokenizer) -> tuple[dict[str, list[Pair]], dict]:
  """Both splits' pairs, cached per (inputs, columns, tokenizer and its BOS, lengths, validation share)."""
  key = (config.data.source, _input_key(config), config.data.preference_columns, tokenizer.fingerprint,
         tokenizer.input_prefix, config.data.seq_len, config.dpo.max_length, config.dpo.max_prompt_length,
         config.data.validation_fraction)
  if key not in _CACHE:
    _CACHE[key] = read_pairs(config, tokenizer)
  return _CACHE[key]


def uses_stored_reference(config) -> bool:
  """config.dpo.precompute_ref with a loss that has a reference (simpo has none)."""
  return config.model.objective == 'dpo' and bool(config.dpo.precompute_ref) and config.dpo.loss_type != 'simpo'


def reference_dir(config, workdir: str | None) -> str:
  """Where precomputed reference sums live (config.dpo.precompute_ref): beside the prepared data."""
  return storage.join(config.data.prepared_dir or storage.join(workdir or '.', 'data'), 'reference_logps')


def _reference_name(role: str, data_key: str, ref_key: str = '*') -> str:
  return f'{role}-{data_key[:16]}-{ref_key[:16]}.npy'


def pairs_key(pairs: Sequence[Pair]) -> str:
  """sha256 of the pairs' tokens in order (prompt, chosen, rejected each with its length): any change of the
  records, the tokenizer, seq_len or truncation changes it."""
  digest = hashlib.sha256()
  for pair in pairs:
    for ids in (pair.prompt, pair.chosen, pair.rejected):
      digest.update(np.int64(ids.size).tobytes())
      digest.update(np.ascontiguousarray(ids, np.int32).tobytes())
  return digest.hexdigest()


def reference_key(reference: dict) -> str:
  """sha256 of the reference's description (its checkpoint and step, or seed, and the model fields)."""
  return hashlib.sha256(json.dumps(reference, sort_keys=True, default=str).encode()).hexdigest()


def reference_sums(rows: dict[str, np.ndarray], logps: np.ndarray, count: int) -> np.ndarray:
  """[count, 2] float32: the sums of `logps` [R,T] over the completion targets (loss_mask) of each pair's chosen
  and rejected sequence, pair i at row i (its id in rows['pair_ids']); accumulated in float64."""
  segments = rows['segment_ids']
  totals = np.zeros((segments.shape[0], 2 * rows['pair_ids'].shape[1] + 1), np.float64)
  np.add.at(totals, (np.arange(segments.shape[0])[:, None], segments), logps * rows['loss_mask'])
  ids = rows['pair_ids']
  out = np.zeros((count, 2), np.float64)
  out[ids[ids >= 0], 0] = totals[:, 1::2][ids >= 0]
  out[ids[ids >= 0], 1] = totals[:, 2::2][ids >= 0]
  return out.astype(np.float32)


def store_reference(config, workdir: str | None, reference: dict, forward, write: bool = True) -> dict[str, str]:
  """config.dpo.precompute_ref: the reference's summed completion log-probs of each split's pairs (chosen,
  rejected: two numbers a pair), in one pass.

  `reference` describes the reference model (keyed with the pairs' tokens in the file name, <split>-<pairs
  key>-<reference key>.npy: a stored file of another reference or other pairs is recomputed, never reused);
  `forward(rows)` maps packed rows [R,T] (R = data.global_batch_size, padding rows at the end of the last chunk)
  to log p_ref(target) [R,T] without gradient; it is only called when a split must be (re)computed. Each split is
  one float32 [pairs, 2] .npy, written atomically (temporary name, then rename) by the process with `write`,
  which then removes the split's other stored files. Returns {split: 'computed' | 'reused'}.
  """
  tokenizer = _tokenizer(config, workdir)
  pairs_by_role, _ = load_pairs(config, tokenizer)
  ref_key = reference_key(reference)
  pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
  chunk = config.data.global_batch_size
  directory = reference_dir(config, workdir)
  done = {}
  for role, pairs in pairs_by_role.items():
    path = storage.join(directory, _reference_name(role, pairs_key(pairs), ref_key))
    if storage.exists(path):
      done[role] = 'reused'
    else:
      rows = pack(pairs, config.data.seq_len, pad_id, ids=np.arange(len(pairs)))
      count = rows['inputs'].shape[0]
      sums = np.zeros((len(pairs), 2), np.float32)
      for first in range(0, count, chunk):
        part = {k: v[first:first + chunk] for k, v in rows.items()}
        real = part['inputs'].shape[0]
        batch = {k: part[k] for k in ('inputs', 'targets', 'segment_ids', 'positions')}
        if real < chunk:  # padding rows (segment 0) fill the last chunk
          batch = {k: np.concatenate([v, np.full((chunk - real,) + v.shape[1:], pad_id if k in ('inputs', 'targets')
                                                 else 0, v.dtype)]) for k, v in batch.items()}
        logps = np.asarray(forward(batch), np.float32)[:real]
        sums += reference_sums(part, logps, len(pairs))  # each pair is in exactly one row
      if write:
        buffer = io.BytesIO()
        np.save(buffer, sums)
        storage.write_bytes(path, buffer.getvalue())
      done[role] = 'computed'
    if write:
      for other in storage.glob(storage.join(directory, _reference_name(role, '*'))):
        if storage.basename(other) != storage.basename(path):
          storage.remove(other)
  return done


def _read_reference(config, workdir: str | None, role: str, pairs: Sequence[Pair]) -> np.ndarray:
  """The stored [pairs, 2] sums of a split's pairs: memory-mapped from a local file (a batch reads its pairs'
  rows only), read whole (8 bytes a pair) from a remote one."""
  directory = reference_dir(config, workdir)
  found = storage.glob(storage.join(directory, _reference_name(role, pairs_key(pairs))))
  if len(found) != 1:
    others = storage.glob(storage.join(directory, _reference_name(role, '*')))
    why = (f'{len(found)} files for these pairs' if found else 'computed for other pairs (the records, tokenizer, '
           'data.seq_len or dpo lengths changed)' if others else 'missing')
    raise PreferenceDataError(f'{storage.join(directory, role)}-*.npy: {why}; config.dpo.precompute_ref reads the '
                              f'reference sums that a training run computes before its first step')
  if storage.is_url(found[0]):
    sums = np.load(io.BytesIO(storage.read_bytes(found[0])))
  else:
    sums = np.load(found[0], mmap_mode='r')
  if sums.shape != (len(pairs), 2):
    raise PreferenceDataError(f'{found[0]}: holds {sums.shape[0]} pairs\' sums for {len(pairs)} pairs; delete it '
                              f'to recompute')
  return sums


def _tokenizer(config, workdir):
  return sft._tokenizer(config, workdir)  # pylint: disable=protected-access  (the same lookup as SFT)


def prepare(config, workdir: str | None = None) -> None:
  """Checks every record (errors name file:line), prints the counts and binds the tokenizer to the workdir."""
  tokenizer = _tokenizer(config, workdir)
  _, stats = load_pairs(config, tokenizer)
  print(summary(stats), flush=True)
  if workdir:
    tokenizer_lib.bind_to_workdir(tokenizer.path, workdir)


def open_split(config, split: str = 'train', workdir: str | None = None, with_reference: bool = False):
  tokenizer = _tokenizer(config, workdir)
  role = _role(config, split)
  pairs_by_role, stats = load_pairs(config, tokenizer)
  pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
  data = PreferenceData(pairs_by_role[role], config.data.seq_len, config.data.global_batch_size, config.data.seed,
                        _SPLIT_IDS[role], pad_id, stats)
  if with_reference:  # the reference sums computed once and stored (store_reference, run by training)
    data.reference = _read_reference(config, workdir, role, pairs_by_role[role])
  return data


def make_iterator(config, split: str = 'train', start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, workdir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Batches start_step, start_step+1, ... of `split` (this process's rows), endless. No TensorFlow."""
  split_data = open_split(config, split, workdir, with_reference=uses_stored_reference(config))
  step = start_step
  while True:
    yield split_data.batch(step, process_index, process_count)
    step += 1
