"""The static-batch reference decoder: a KV cache, the prompts prefilled at once, then one jitted `lax.while_loop`.

Every job decodes on the serving engine (llm_jax.serving); this module stays as the independent reference the
engine's tests compare to, and for its sampling-set helpers.

  generate(cfg, params, prompts, max_new_tokens, sampling, ...) -> tokens [B, N]   token ids in, token ids out
  complete(cfg, params, tokenizer, texts, ...)                  -> list[str]        text in, text out

Prompts of different lengths are left-padded to a common length P (segment id 0: pads are never attended, and
each row's positions start at 0 at its first real token), so after the prefill every row's next token comes from
the last column and all rows write the cache slot P + i at step i. Decoding uses the training parameters as they
are (scanned or unrolled, sharded or not); only the model's `decode` flag differs.

Sampling (`Sampling`): temperature 0 is greedy; otherwise logits / temperature, restricted to the top_k largest
(0 = all) and to the smallest set whose probability reaches top_p (nucleus; 1 = all), then a categorical draw
with the key folded from (seed, step). A row stops after EOS or max_new_tokens (or at model.max_seq_len); the
loop stops when every row has. Shapes: B batch, P padded prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import objectives
from llm_jax.model import Transformer, TransformerConfig, init_cache
from llm_jax.errors import UserError

PROMPT_BUCKET = 16  # padded prompt lengths are rounded up to a multiple of this, so few shapes get compiled


class GenerationError(UserError, ValueError):
  """A generation request that cannot work (sampling settings, model objective); the message names the setting."""


class PromptError(GenerationError):
  """A prompt cannot be decoded (empty, or too long for the model); the message names the prompt."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen from the logits (hashable: part of the compiled loop's identity)."""
  temperature: float = 0.0  # 0 = greedy (argmax)
  top_k: int = 0  # keep the k most likely tokens; 0 = no limit
  top_p: float = 1.0  # keep the smallest set of most likely tokens with total probability >= top_p; 1 = all

  def __post_init__(self):
    if self.temperature < 0:
      raise GenerationError(f'temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise GenerationError(f'top_k must be >= 0 (0 = no limit), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise GenerationError(f'top_p must be in (0, 1], got {self.top_p}')


def allowed_logits(logits: jax.Array, sampling: Sampling, vocab_limit: int | None = None) -> jax.Array:
  """[B,V] float32 logits / temperature with every token outside the top-k / top-p set (or >= vocab_limit) at
  -inf. Not used for greedy decoding (temperature 0)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  if vocab_limit is not None and vocab_limit < vocab:  # padded vocabulary: ids the tokenizer never makes
    logits = jnp.where(jnp.arange(vocab) < vocab_limit, logits, -jnp.inf)
  logits = logits / sampling.temperature
  if sampling.top_k and sampling.top_k < vocab:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B,1] the k-th largest logit
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if sampling.top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B,V] descending
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
    keep = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)  # [B,1] >= 1: the top token is kept
    threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)  # [B,1] smallest kept logit
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return logits


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling, vocab_limit: int | None = None) -> jax.Array:
  """[B,V] logits -> [B] int32 token ids."""
  if sampling.temperature == 0.0:
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
      logits = logits[:, :vocab_limit]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, allowed_logits(logits, sampling, vocab_limit), axis=-1).astype(jnp.int32)


def check_prompts(prompts: Sequence[Sequence], max_seq_len: int) -> None:
  """Raises PromptError naming the first prompt (token list or text) that is empty or leaves no room to generate
  within max_seq_len tokens."""
  if not prompts:
    raise PromptError('no prompts given')
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise PromptError(f'prompt {i} is empty')
    if len(prompt) >= max_seq_len and not isinstance(prompt, str):
      raise PromptError(f'prompt {i} has {len(prompt)} tokens; model.max_seq_len={max_seq_len} leaves no room to '
                        f'generate (at most {max_seq_len - 1} prompt tokens)')


def left_pad(prompts: Sequence[Sequence[int]], max_seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Token lists -> left-padded int32 arrays tokens, segment_ids, positions [B,P] and lengths [B].

  P is the longest prompt rounded up to PROMPT_BUCKET (at most max_seq_len); bad prompts: see check_prompts.
  """
  check_prompts(prompts, max_seq_len)
  longest = max(len(p) for p in prompts)
  width = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, max_seq_len)
  b = len(prompts)
  tokens = np.full((b, width), pad_id, np.int32)
  segment_ids = np.zeros((b, width), np.int32)
  positions = np.zeros((b, width), np.int32)
  lengths = np.array([len(p) for p in prompts], np.int32)
  for i, prompt in enumerate(prompts):
    n = len(prompt)
    tokens[i, width - n:] = prompt
    segment_ids[i, width - n:] = 1
    positions[i, width - n:] = np.arange(n)
  return dict(tokens=tokens, segment_ids=segment_ids, positions=positions, lengths=lengths)


def decode_config(cfg: TransformerConfig) -> TransformerConfig:
  """The model config used to decode: same parameters, no remat (no gradients), the xla attention kernel."""
  return dataclasses.replace(cfg, remat='none', attention='xla')


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'sampling', 'eos_id', 'pad_id',
                                             'vocab_limit'))
def _decode(params, tokens, segment_ids, positions, lengths, rng, *, cfg: TransformerConfig, max_new_tokens: int,
            sampling: Sampling, eos_id: int | None, pad_id: int, vocab_limit: int | None):
  """Prefill + while_loop. tokens/segment_ids/positions [B,P], lengths [B] -> (new tokens [B,N], counts [B])."""
  model = Transformer(cfg, decode=True)
  b, p = tokens.shape
  n = max_new_tokens
  limits = jnp.minimum(n, cfg.max_seq_len - lengths)  # [B] tokens row b may add
  cache = init_cache(cfg, b, p + n)
  logits, variables = model.apply({'params': params, 'cache': cache}, tokens, segment_ids, positions,
                                  mutable=['cache'])  # [B,P,V]
  is_eos = (lambda t: t == eos_id) if eos_id is not None else (lambda t: jnp.zeros_like(t, bool))

  first = sample(logits[:, -1], jax.random.fold_in(rng, 0), sampling, vocab_limit)  # [B]
  out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
  done = is_eos(first) | (limits <= 1)  # [B]
  counts = jnp.ones((b,), jnp.int32)

  def cond(state):
    i, _, _, done, _, _ = state
    return (i < n) & ~jnp.all(done)

  def body(state):
    i, previous, out, done, counts, cache = state  # previous [B]: token i-1, not yet in the cache
    step_positions = (lengths + i - 1)[:, None]  # [B,1]
    logits, variables = model.apply({'params': params, 'cache': cache}, previous[:, None],
                                    jnp.ones((b, 1), jnp.int32), step_positions, mutable=['cache'])
    token = sample(logits[:, 0], jax.random.fold_in(rng, i), sampling, vocab_limit)
    token = jnp.where(done, pad_id, token)
    counts = counts + (~done).astype(jnp.int32)
    done = done | is_eos(token) | (i + 1 >= limits)
    return i + 1, token, out.at[:, i].set(token), done, counts, variables['cache']

  state = (jnp.ones((), jnp.int32), first, out, done, counts, variables['cache'])
  _, _, out, _, counts, _ = jax.lax.while_loop(cond, body, state)
  return out, counts


def generate(cfg: TransformerConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0, eos_id: int | None = None, pad_id: int = 0,
             vocab_limit: int | None = None) -> list[list[int]]:
  """New tokens of each prompt (token ids, without the prompt): at most max_new_tokens, ending at the first EOS
  (included), never past model.max_seq_len. `vocab_limit` (the tokenizer's size) keeps sampling away from the
  unused ids of a padded vocabulary. `params` may be sharded; the loop then runs sharded."""
  if not objectives.REGISTRY[cfg.objective].causal:
    raise GenerationError(f'config.model.objective={cfg.objective!r}: only a causal model (clm, dpo) can generate')
  if max_new_tokens <= 0:
    raise GenerationError(f'max_new_tokens must be positive, got {max_new_tokens}')
  batch = left_pad(prompts, cfg.max_seq_len, pad_id)
  out, counts = _decode(params, batch['tokens'], batch['segment_ids'], batch['positions'], batch['lengths'],
                        jax.random.key(seed), cfg=decode_config(cfg), max_new_tokens=int(max_new_tokens),
                        sampling=sampling, eos_id=eos_id, pad_id=pad_id, vocab_limit=vocab_limit)
  out, counts = np.asarray(jax.device_get(out)), np.asarray(jax.device_get(counts))
  return [row[:count].tolist() for row, count in zip(out, counts)]


def complete(cfg: TransformerConfig, params, tokenizer: Any, texts: Sequence[str], max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0, batch_size: int = 16,
             encode: Callable[[str], list[int]] | None = None) -> list[str]:
  """Completions of `texts` (the generated text only, without the prompt and the EOS), `batch_size` at a time.

  `tokenizer` needs encode, decode, eos_id, pad_id and vocab_size (llm_jax.data.tokenizer.Tokenizer).
  `encode` turns a text into the prompt tokens (default `tokenizer.encode`); a fine-tuned model is prompted
  through its chat template instead (llm_jax.tasks.prompt_encoder).
  """
  encode = encode or tokenizer.encode
  check_prompts(texts, cfg.max_seq_len)
  ids = [list(encode(text)) for text in texts]
  check_prompts(ids, cfg.max_seq_len)
  completions = []
  for start in range(0, len(ids), batch_size):
    new = generate(cfg, params, ids[start:start + batch_size], max_new_tokens, sampling, seed + start,
                   tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size)
    completions += [tokenizer.decode([t for t in row if t != tokenizer.eos_id]) for row in new]
  return completions
