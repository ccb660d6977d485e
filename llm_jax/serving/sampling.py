"""Per-request sampling settings, and the batched sampler that applies each row's own settings on the device.

`SamplingParams` is what a request asks for (OpenAI's and vLLM's names). `sample_rows` draws one token for every
row of a batch whose rows have different settings: the settings travel as arrays [B], so one compiled function
serves any mix of greedy and sampled requests. Per row, in order:

  penalties      logits - presence * (token seen in the output) - frequency * (its count in the output)
  temperature    0 = greedy (argmax of the penalised logits); otherwise logits / temperature
  top_k          keep the k largest (0 = all)
  top_p          keep the smallest set whose probability reaches top_p (1 = all)
  min_p          keep tokens whose probability is >= min_p * the top token's (0 = all)
  draw           categorical, with the key folded from (the request's seed, the token's index in its output)

so a request with a seed gets the same tokens whatever else shares its batch. Logprobs are of the model's
distribution (log_softmax of the raw logits), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError

MAX_LOGPROBS = 20  # OpenAI's cap on `logprobs` / `top_logprobs`


class SamplingError(UserError, ValueError):
  """A sampling setting out of range; the message names the field as the API spells it."""


@dataclasses.dataclass
class SamplingParams:
  """What one request asks of the sampler (field names as in OpenAI's API and vLLM)."""
  max_tokens: int = 16  # new tokens at most (0: score the prompt only, with echo/prompt_logprobs)
  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0  # 0 = no limit (OpenAI has no top_k; vLLM's -1 is accepted as 0)
  min_p: float = 0.0
  seed: int | None = None  # None: the engine picks one (then outputs are not reproducible across runs)
  stop: Sequence[str] = ()  # stop strings: the output ends before the first one (not included)
  stop_token_ids: Sequence[int] = ()  # the output ends at one of these (included in token_ids, not in text)
  ignore_eos: bool = False
  n: int = 1  # completions of the prompt (each with its own seed: seed, seed + 1, ...)
  logprobs: int | None = None  # top logprobs per generated token (0 = only the chosen token's)
  prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0

  def __post_init__(self):
    self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
    self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))
    if self.top_k == -1:
      self.top_k = 0
    self.check()

  def check(self) -> None:
    def bad(field, message):
      raise SamplingError(f'{field}: {message}')
    if self.max_tokens < 0:
      bad('max_tokens', f'must be >= 0, got {self.max_tokens}')
    if not 0.0 <= self.temperature <= 100.0:
      bad('temperature', f'must be in [0, 100], got {self.temperature}')
    if not 0.0 < self.top_p <= 1.0:
      bad('top_p', f'must be in (0, 1], got {self.top_p}')
    if self.top_k < 0:
      bad('top_k', f'must be >= 0 (0 or -1 = no limit), got {self.top_k}')
    if not 0.0 <= self.min_p <= 1.0:
      bad('min_p', f'must be in [0, 1], got {self.min_p}')
    if self.n < 1:
      bad('n', f'must be >= 1, got {self.n}')
    for name in ('logprobs', 'prompt_logprobs'):
      value = getattr(self, name)
      if value is not None and not 0 <= value <= MAX_LOGPROBS:
        bad(name, f'must be in [0, {MAX_LOGPROBS}], got {value}')
    for name in ('presence_penalty', 'frequency_penalty'):
      if not -2.0 <= getattr(self, name) <= 2.0:
        bad(name, f'must be in [-2, 2], got {getattr(self, name)}')
    if self.seed is not None and not 0 <= self.seed < 2 ** 63:
      bad('seed', f'must be a non-negative 64-bit integer, got {self.seed}')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  @property
  def penalised(self) -> bool:
    return bool(self.presence_penalty or self.frequency_penalty)


@dataclasses.dataclass(frozen=True)
class RowSettings:
  """SamplingParams of the rows of one batch, as arrays [B] (a pytree: jitted code takes it as an argument)."""
  temperature: jax.Array  # float32
  top_p: jax.Array  # float32
  top_k: jax.Array  # int32, 0 = all
  min_p: jax.Array  # float32
  presence: jax.Array  # float32
  frequency: jax.Array  # float32
  seed: jax.Array  # uint32 [B,2]: the request's 64-bit seed as two words
  index: jax.Array  # int32: index of the token being drawn in its output (folds the key)


jax.tree_util.register_dataclass(RowSettings, data_fields=[f.name for f in dataclasses.fields(RowSettings)],
                                 meta_fields=[])


def _row_key(seed, index):
  key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
  return jax.random.fold_in(key, index)


def sample_rows(logits: jax.Array, settings: RowSettings, counts: jax.Array | None, vocab_limit: int,
                num_logprobs: int, sampled: bool = True, filtered: bool = True
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """logits [B,V] -> (tokens [B] int32, their logprobs [B], top ids [B,L], top logprobs [B,L]) with L =
  num_logprobs (static; 0 gives empty arrays). `counts` [B,V] int32: each token's count in the row's output so
  far (None when no row has penalties). Ids >= vocab_limit (a padded vocabulary) are never drawn.

  Static shortcuts, for batches that need less (the result is the same): sampled=False when every row is
  greedy (no draw), filtered=False when no row has top_k, top_p or min_p (no sort of the vocabulary)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if vocab_limit < vocab:
    logits = jnp.where(jnp.arange(vocab) < vocab_limit, logits, -jnp.inf)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  scores = logits
  if counts is not None:
    scores = scores - settings.presence[:, None] * (counts > 0) - settings.frequency[:, None] * counts
  greedy_tokens = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  tokens = greedy_tokens if not sampled else _draw(scores, settings, greedy_tokens, filtered)

  chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
  if num_logprobs:
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_logprobs)
  else:
    top_logprobs, top_ids = jnp.zeros((logits.shape[0], 0)), jnp.zeros((logits.shape[0], 0), jnp.int32)
  return tokens, chosen, top_ids.astype(jnp.int32), top_logprobs


def _draw(scores, settings: RowSettings, greedy_tokens, filtered: bool):
  """Each row's draw from its filtered, tempered distribution (greedy rows keep their argmax)."""
  vocab = scores.shape[-1]
  temperature = jnp.where(settings.temperature > 0, settings.temperature, 1.0)[:, None]
  scaled = scores / temperature
  keys = jax.vmap(_row_key)(settings.seed, settings.index)
  if not filtered:
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(settings.temperature > 0, drawn, greedy_tokens)
  ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B,V] descending
  # top_k: the k-th largest as a threshold (k = 0: all)
  k = jnp.where(settings.top_k > 0, jnp.minimum(settings.top_k, vocab), vocab)
  kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
  # top_p over what top_k kept, min_p against the top token
  kept_sorted = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ordered, -jnp.inf)
  probs = jax.nn.softmax(kept_sorted, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = jnp.maximum(jnp.sum(mass_before < settings.top_p[:, None], axis=-1), 1)
  pth = jnp.take_along_axis(ordered, (keep - 1)[:, None], axis=-1)
  min_p_floor = ordered[:, :1] + jnp.log(jnp.maximum(settings.min_p, 1e-30))[:, None]  # log(min_p * p_top)
  threshold = jnp.maximum(jnp.maximum(kth, pth), jnp.where(settings.min_p[:, None] > 0, min_p_floor, -jnp.inf))
  allowed = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, allowed).astype(jnp.int32)
  return jnp.where(settings.temperature > 0, drawn, greedy_tokens)


def logprob_bucket(wanted: int) -> int:
  """The static top-logprob count compiled for a batch: 0, 5 or MAX_LOGPROBS (few shapes)."""
  if wanted <= 0:
    return 0
  return 5 if wanted <= 5 else MAX_LOGPROBS
