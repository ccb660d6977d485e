"""Autoregressive decoding with a KV cache: prefill the prompts at once, then one jitted `lax.while_loop`.

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

import copy
import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model import Transformer, TransformerConfig, init_cache

PROMPT_BUCKET = 16  # padded prompt lengths are rounded up to a multiple of this, so few shapes get compiled


class PromptError(ValueError):
  """A prompt cannot be decoded (empty, or too long for the model); the message names the prompt."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen from the logits (hashable: part of the compiled loop's identity)."""
  temperature: float = 0.0  # 0 = greedy (argmax)
  top_k: int = 0  # keep the k most likely tokens; 0 = no limit
  top_p: float = 1.0  # keep the smallest set of most likely tokens with total probability >= top_p; 1 = all

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0 (0 = no limit), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')


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
  if cfg.objective != 'clm':
    raise ValueError(f'config.model.objective={cfg.objective!r}: only a causal (clm) model can generate')
  if max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be positive, got {max_new_tokens}')
  batch = left_pad(prompts, cfg.max_seq_len, pad_id)
  out, counts = _decode(params, batch['tokens'], batch['segment_ids'], batch['positions'], batch['lengths'],
                        jax.random.key(seed), cfg=decode_config(cfg), max_new_tokens=int(max_new_tokens),
                        sampling=sampling, eos_id=eos_id, pad_id=pad_id, vocab_limit=vocab_limit)
  out, counts = np.asarray(jax.device_get(out)), np.asarray(jax.device_get(counts))
  return [row[:count].tolist() for row, count in zip(out, counts)]


def complete(cfg: TransformerConfig, params, tokenizer: Any, texts: Sequence[str], max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0, batch_size: int = 16) -> list[str]:
  """Completions of `texts` (the generated text only, without the prompt and the EOS), `batch_size` at a time.

  `tokenizer` needs encode, decode, eos_id, pad_id and vocab_size (llm_jax.data.tokenizer.Tokenizer).
  """
  check_prompts(texts, cfg.max_seq_len)
  ids = [tokenizer.encode(text) for text in texts]
  check_prompts(ids, cfg.max_seq_len)
  completions = []
  for start in range(0, len(ids), batch_size):
    new = generate(cfg, params, ids[start:start + batch_size], max_new_tokens, sampling, seed + start,
                   tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size)
    completions += [tokenizer.decode([t for t in row if t != tokenizer.eos_id]) for row in new]
  return completions


# --- a workdir's model for inference (generate, evaluate) ----------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
  """A workdir's checkpoint, ready to decode or score: `trainer` holds the config, mesh and the eval step."""
  trainer: Any  # llm_jax.train.Trainer built from the workdir's config (no optimizer state is loaded)
  params: Any  # parameters on the trainer's mesh
  tokenizer: Any  # llm_jax.data.tokenizer.Tokenizer, or None when the workdir has none (synthetic data)
  step: int  # the checkpoint's step

  @property
  def config(self):
    return self.trainer.config

  @property
  def model_config(self) -> TransformerConfig:
    return TransformerConfig.from_config(self.config)


def load_workdir(workdir: str, config=None, step: int | None = None, tokenizer_path: str = '', devices=None,
                 need_tokenizer: bool = True) -> LoadedModel:
  """The latest (or `step`'s) parameters of a workdir, sharded as its config says, and its tokenizer.

  `config` defaults to the workdir's config.json. When the run's mesh does not fit the devices here, the
  parameters are replicated instead (mesh data=-1). Errors, each one message naming the path: unknown workdir,
  no config.json, no checkpoint, no tokenizer (when `need_tokenizer`), a tokenizer other than the checkpoint's.
  """
  from llm_jax import checkpoint
  from llm_jax import config as config_lib
  from llm_jax import train
  from llm_jax.data import tokenizer as tokenizer_lib

  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir {workdir}: no such directory')
  config = config if config is not None else config_lib.load_workdir_config(workdir)
  step = checkpoint.latest_step(workdir) if step is None else step
  if step is None:
    raise FileNotFoundError(f'--workdir {workdir}: no complete checkpoint under {checkpoint.checkpoint_dir(workdir)} '
                            f'(train first, or wait for the first checkpoint)')
  tokenizer = None
  path = tokenizer_path or os.path.join(workdir, tokenizer_lib.WORKDIR_MODEL)
  if os.path.exists(path):
    tokenizer = tokenizer_lib.load_from_workdir(workdir) if not tokenizer_path else tokenizer_lib.load(path)
    tokenizer_lib.check_vocab(config, tokenizer)
  elif need_tokenizer or tokenizer_path:
    raise FileNotFoundError(f'{path}: no tokenizer (a run on data.source=synthetic has none); pass a tokenizer '
                            f'file or use a workdir trained on text')
  devices = list(devices if devices is not None else jax.devices())
  try:
    config_lib.resolve_mesh_shape(config.mesh, len(devices))
  except config_lib.ConfigError:
    config = copy.deepcopy(config)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  trainer = train.Trainer(config, workdir, devices)
  params, meta = checkpoint.load_params(workdir, train.abstract_params(config, mesh=trainer.mesh), step)
  recorded = meta.get('tokenizer_fingerprint')
  if tokenizer is not None and recorded:
    tokenizer_lib.check_fingerprint(tokenizer, recorded, f'the checkpoint {checkpoint.checkpoint_dir(workdir)}/{step}')
  return LoadedModel(trainer=trainer, params=params, tokenizer=tokenizer, step=int(step))


def generation_tasks(config, params, workdir: str, step: int, writer) -> dict[str, float]:
  """The training loop's hook: greedy completions of config.eval.task_file, scored (text_metrics) and logged.

  Writes one metrics row {step, task_bleu, task_rouge1, task_rouge2, task_rougeL, task_examples} and
  config.eval.log_samples samples (metrics.jsonl row `task_samples`, TensorBoard text `samples/i`). Needs the
  workdir's tokenizer; returns the row.
  """
  from llm_jax import text_metrics
  from llm_jax.data import tokenizer as tokenizer_lib
  e = config.eval
  records = text_metrics.read_tasks(e.task_file, e.task_max_examples)
  tokenizer = tokenizer_lib.load_from_workdir(workdir)
  completions = complete(TransformerConfig.from_config(config), params, tokenizer,
                         [r['prompt'] for r in records], e.max_new_tokens)
  result, samples = text_metrics.score_tasks(records, completions, e.log_samples)
  row = dict(step=step, **{f'task_{k}': v for k, v in result.items()})
  writer.write(dict(row, task_samples=samples) if samples else row)
  for i, sample in enumerate(samples):
    writer.write_text(f'samples/{i}', f'{sample["prompt"]}**{sample["completion"]}**\n\n(reference: '
                      f'{sample["reference"]})', step)
  return row
