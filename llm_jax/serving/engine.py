"""The serving engine: requests in, tokens out, with a paged K/V cache and continuous batching.

  engine = Engine(model_config, params, tokenizer)          # or Engine.from_workdir(workdir)
  engine.add_request(prompt, SamplingParams(max_tokens=64))  # token ids or text
  while engine.has_unfinished():
      for update in engine.step(): ...                      # RequestOutput of every request the step moved
  engine.generate(prompts, params) -> [RequestOutput]       # the same, blocking

One `step()`: the scheduler (scheduler.py) picks the chunks to prefill and the sequences to decode; the prefill
chunks run as one batch [Bp, C] and the decoding sequences as one batch [B, 1], each a single jitted call of the
model over the page pool (model.attention.PageTable) followed by the batched sampler (sampling.py); then each
sampled token is appended, stop conditions are checked, full pages enter the prefix cache and finished sequences
release their pages. Shapes are bucketed (rows and chunk lengths to powers of two, page-table width to a power of
two of pages), so a long-running server compiles a fixed, small set of functions.

The model runs with unrolled layers (`set_params` unstacks a scanned model's parameters once): the pool is one
array per layer, donated to each call and updated in place, where a scan over layers would copy the whole pool
every step. Under a mesh, the pool is split over the kv heads like the attention (tensor parallelism) and rows
are not split: a decode batch is a handful of rows. The pool of a layer is one array [num_pages, page_size, 2K, H]
(keys and values interleaved over the heads); the kernel that attends over it (EngineConfig.attention:
model.attention.PAGED_KERNELS) is chosen once, for the platform of the engine's devices: jax's Pallas ragged
paged attention on TPU, the blocked kernel (online softmax a block of pages at a time) on CPU, the xla gather on
GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any, Sequence as Seq

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from jax.sharding import NamedSharding

from llm_jax.errors import UserError
from llm_jax.model import Transformer, TransformerConfig, layer_location
from llm_jax.model.transformer import DTYPES
from llm_jax.model import attention
from llm_jax.model.attention import PageTable
from llm_jax.model.context import axes_size
from llm_jax.runtime import sharding_context
from llm_jax.serving.outputs import CompletionOutput, RequestOutput
from llm_jax.serving.pages import PagePool
from llm_jax.serving.sampling import RowSettings, SamplingParams, logprob_bucket, sample_rows
from llm_jax.serving.scheduler import Plan, Scheduler, Sequence, bucket


# The smallest compiled prefill width and page-table width (in tokens): below these, more shapes would cost more
# compiles than the padding costs compute.
MIN_CONTEXT_BUCKET = 128


class RequestError(UserError, ValueError):
  """A request the engine cannot serve; `field` names the request field at fault (as the API spells it)."""

  def __init__(self, field: str, message: str):
    super().__init__(f'{field}: {message}')
    self.field = field


ENGINE_DTYPES = ('auto',) + DTYPES  # EngineConfig.dtype


def compute_dtype(name: str, model_dtype: str, platform: str) -> str:
  """EngineConfig.dtype resolved for the platform. On CPU, 'auto' computes in float32: XLA:CPU has no bfloat16 or
  float16 dot, so it converts both operands to float32 each step (the weights too), which made a 125m decode step
  about 7 times slower than float32 (docs/serving.md)."""
  if name != 'auto':
    return name
  return 'float32' if platform == 'cpu' else model_dtype


class QueueFullError(UserError, RuntimeError):
  """EngineConfig.max_queue requests are already waiting."""


@dataclasses.dataclass
class EngineConfig:
  page_size: int = 16  # tokens a page
  num_pages: int = 0  # pages in the pool (one is the null page); 0 = enough for max_seqs full-length sequences,
  #                     capped by memory_fraction of the device memory left, where the device reports it
  memory_fraction: float = 0.8  # share of the free device memory the pool may take when num_pages = 0
  max_seqs: int = 32  # sequences decoding at once (rows of the decode batch)
  max_chunk: int = 256  # tokens of one sequence prefilled per step (chunked prefill)
  max_prefill_tokens: int = 512  # prefill token slots per step, over all sequences: the bucketed batch (rows x
  #                                 chunk width, padding included) a step's chunks are compiled as
  prefix_caching: bool = True
  max_queue: int = 4096  # waiting sequences; beyond that add_request raises QueueFullError
  max_model_len: int = 0  # prompt + output tokens of one sequence; 0 = model.max_seq_len
  attention: str = 'auto'  # paged attention kernel (model.attention.PAGED_KERNELS): auto (ragged on TPU where
  #                          head_dim % 128 == 0, blocked on CPU, xla elsewhere), xla (gather; the reference),
  #                          blocked (a block of pages at a time, online softmax) or ragged (TPU only)
  dtype: str = 'auto'  # compute dtype of the forward and the KV pool (ENGINE_DTYPES): auto (the model's model.dtype,
  #                      except on CPU: float32, as XLA:CPU runs a bfloat16 dot in float32 after converting both
  #                      operands, weights included, on every step), float32, bfloat16 or float16

  def check(self) -> None:
    for name in ('page_size', 'max_seqs', 'max_chunk', 'max_prefill_tokens', 'max_queue'):
      if getattr(self, name) <= 0:
        raise RequestError(f'engine.{name}', f'must be positive, got {getattr(self, name)}')
    if self.num_pages < 0 or self.max_model_len < 0:
      raise RequestError('engine.num_pages', 'num_pages and max_model_len must be >= 0 (0 = automatic)')
    if not 0 < self.memory_fraction <= 1:
      raise RequestError('engine.memory_fraction', f'must be in (0, 1], got {self.memory_fraction}')
    if self.attention not in attention.PAGED_CHOICES:
      raise RequestError('engine.attention', f'{self.attention!r} is not one of {", ".join(attention.PAGED_CHOICES)}')
    if self.dtype not in ENGINE_DTYPES:
      raise RequestError('engine.dtype', f'{self.dtype!r} is not one of {", ".join(ENGINE_DTYPES)}')


@dataclasses.dataclass(eq=False)
class _Request:
  request_id: str
  prompt: list[int]
  params: SamplingParams
  seqs: list[Sequence]
  arrival: float
  prompt_logprobs: list[dict[int, float] | None] | None = None
  first_token: float | None = None
  finished_at: float | None = None

  @property
  def finished(self) -> bool:
    return all(seq.finished for seq in self.seqs)


def unstack_layers(params: Any, model_config: TransformerConfig) -> Any:
  """A scanned model's parameters (params['layers'] stacked on a leading axis, by layer or by repeat of the
  attention pattern: layer_pattern.layer_location) as an unrolled model's (params['layers_0'], ...); other trees
  are returned as they are."""
  if 'layers' not in params:
    return params
  out = {k: v for k, v in params.items() if k != 'layers'}
  scanned = dataclasses.replace(model_config, scan_layers=True)
  for i in range(model_config.num_layers):
    path, index = layer_location(scanned, i)
    if index is not None:
      subtree = params
      for key in path:
        subtree = subtree[key]
      out[f'layers_{i}'] = jax.tree.map(lambda x, index=index: x[index], subtree)
  return out


class Engine:

  def __init__(self, model_config: TransformerConfig, params: Any, tokenizer: Any = None,
               config: EngineConfig = EngineConfig(), mesh=None, rules=(), model_name: str = 'llm_jax',
               eos_id: int | None = None):
    config.check()
    self.config = config
    self.model_name = model_name
    self.tokenizer = tokenizer
    self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, 'eos_id', None)
    self.vocab_limit = getattr(tokenizer, 'vocab_size', None) or model_config.vocab_size
    self.platform = attention.platform_of(jax.devices() if mesh is None else mesh.devices.flat)
    self.model_config = dataclasses.replace(model_config, scan_layers=False, remat='none', attention='xla',
                                            dtype=compute_dtype(config.dtype, model_config.dtype, self.platform))
    self.model = Transformer(self.model_config, decode=True)
    self.max_model_len = min(config.max_model_len or model_config.max_seq_len, model_config.max_seq_len)
    self.mesh = mesh
    # rows are never split over devices (a decode batch is small); everything else follows the run's rules
    self.rules = tuple((name, None if name == 'act_batch' else axes) for name, axes in rules)
    self.set_params(params)
    self.attention = paged_kernel(config.attention, self.model_config, self.platform, mesh, self.rules)
    num_pages = config.num_pages or self._auto_pages()
    self.pool = PagePool(num_pages, config.page_size, config.prefix_caching)
    self.max_pages_per_seq = -(-self.max_model_len // config.page_size)
    self.scheduler = Scheduler(self.pool, config.max_seqs, config.max_chunk, config.max_prefill_tokens)
    self.kv_pool = self._allocate_pool(num_pages)
    self._requests: dict[str, _Request] = {}
    self._ids = itertools.count()
    self._seeds = np.random.default_rng()
    self.counters = dict(prompt_tokens=0, generated_tokens=0, requests_finished=0, steps=0, batch_tokens=0,
                         batch_slots=0)  # tokens the model computed, and the bucketed slots it computed them in
    self._run = _compiled_step(self.model_config, self.rules, mesh)

  @classmethod
  def from_workdir(cls, workdir: str, config: EngineConfig = EngineConfig(), step: int | None = None,
                   model_name: str | None = None) -> 'Engine':
    """A workdir's checkpoint (its adapters too, for a LoRA run) and tokenizer, on the devices here."""
    from llm_jax import workdir as workdir_lib
    loaded = workdir_lib.load_workdir(workdir, step=step)
    name = model_name or workdir.rstrip('/').split('/')[-1]
    return cls(loaded.model_config, loaded.params, loaded.tokenizer, config, loaded.runtime.mesh,
               loaded.runtime.rules, name)

  # Parameters and the pool.
  def set_params(self, params: Any) -> None:
    """Serve these parameters from the next step on (a scanned model's are unstacked once, here). On CPU, weights
    stored in a narrower float than the compute dtype are widened once here, not converted on every step."""
    params = unstack_layers(params, self.model_config)
    if self.platform == 'cpu':
      wide = jnp.dtype(self.model_config.dtype)
      params = jax.tree.map(lambda x: x.astype(wide) if jnp.issubdtype(x.dtype, jnp.floating)
                            and jnp.dtype(x.dtype).itemsize < wide.itemsize else x, params)
    self.params = params

  def _kv_bytes_per_token(self) -> int:
    cfg = self.model_config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize

  def _auto_pages(self) -> int:
    wanted = self.config.max_seqs * -(-self.max_model_len // self.config.page_size) + 1
    stats = jax.devices()[0].memory_stats() if self.mesh is None else self.mesh.devices.flat[0].memory_stats()
    if stats and stats.get('bytes_limit'):
      free = stats['bytes_limit'] - stats.get('bytes_in_use', 0)
      shards = 1 if self.mesh is None else self.mesh.size
      fit = int(free * self.config.memory_fraction * shards // (self._kv_bytes_per_token() * self.config.page_size))
      wanted = min(wanted, fit)
    return max(wanted, 2)

  def _allocate_pool(self, num_pages: int):
    table = PageTable(jnp.zeros((1, 1), jnp.int32), self.config.page_size, num_pages)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: self.model.init(jax.random.key(0), tokens, tokens, tokens, table))['cache']

    def zeros(s):
      if self.mesh is None:
        return jnp.zeros(s.shape, s.dtype)
      sharding = pool_sharding(self.mesh, self.rules, s.shape)
      return jax.jit(lambda: jnp.zeros(s.shape, s.dtype), out_shardings=sharding)()
    return jax.tree.map(zeros, shapes)

  # Requests.
  def add_request(self, prompt: Seq[int] | str, params: SamplingParams | None = None,
                  request_id: str | None = None) -> str:
    params = params or SamplingParams()
    params.check()
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise RequestError('prompt', 'this model has no tokenizer: send token ids')
      # as model input: BOS first where the tokenizer adds one (llm_jax.data.tokenizer); a bare encode otherwise
      prompt = getattr(self.tokenizer, 'encode_prompt', self.tokenizer.encode)(prompt)
    prompt = [int(t) for t in prompt]
    if not prompt:
      raise RequestError('prompt', 'is empty')
    if any(not 0 <= t < self.model_config.vocab_size for t in prompt):
      raise RequestError('prompt', f'token ids must be in [0, {self.model_config.vocab_size})')
    total = len(prompt) + params.max_tokens
    if len(prompt) > self.max_model_len:
      raise RequestError('prompt', f'{len(prompt)} tokens; the model takes at most {self.max_model_len}')
    if total > self.max_model_len:
      raise RequestError('max_tokens', f'prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = '
                         f'{total} exceeds the model\'s context of {self.max_model_len} tokens')
    if -(-total // self.config.page_size) > self.pool.usable:
      raise RequestError('max_tokens', f'{total} tokens need more pages than the pool has '
                         f'({self.pool.usable} of {self.config.page_size} tokens)')
    if len(self.scheduler.waiting) + params.n > self.config.max_queue:
      raise QueueFullError(f'{len(self.scheduler.waiting)} sequences are waiting (engine.max_queue='
                           f'{self.config.max_queue}); retry later')
    request_id = request_id or f'req-{next(self._ids)}'
    if request_id in self._requests:
      raise RequestError('request_id', f'{request_id!r} is already running')
    seed = params.seed if params.seed is not None else int(self._seeds.integers(2 ** 62))
    request = _Request(request_id, prompt, params, [], time.monotonic())
    if params.prompt_logprobs is not None:
      request.prompt_logprobs = [None] + [None] * (len(prompt) - 1)
    for i in range(params.n):
      seq = Sequence(request, i, list(prompt), len(prompt), seed + i,
                     logprobs=[] if params.logprobs is not None else None,
                     prefix_cache=params.prompt_logprobs is None or i > 0)
      request.seqs.append(seq)
      self.scheduler.add(seq)
    self._requests[request_id] = request
    self.counters['prompt_tokens'] += len(prompt)
    return request_id

  def abort(self, request_id: str) -> None:
    request = self._requests.pop(request_id, None)
    if request is None:
      return
    for seq in request.seqs:
      if not seq.finished:
        seq.finish_reason = 'abort'
      self.scheduler.remove(seq)

  def has_unfinished(self) -> bool:
    return bool(self._requests)

  def stats(self) -> dict[str, int]:
    return dict(waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
                requests=len(self._requests), pages_total=self.pool.usable, pages_used=self.pool.used,
                pages_cached_idle=self.pool.available - len(self.pool._free),
                prefix_cache_hit_tokens=self.pool.hit_tokens, preemptions=self.scheduler.preemptions,
                page_size=self.config.page_size, **self.counters)

  def generate(self, prompts: Seq[Seq[int] | str], params: SamplingParams | Seq[SamplingParams] | None = None
               ) -> list[RequestOutput]:
    """Every prompt to completion (blocking); outputs in the prompts' order."""
    if params is None or isinstance(params, SamplingParams):
      params = [params or SamplingParams()] * len(prompts)
    ids = [self.add_request(p, dataclasses.replace(s)) for p, s in zip(prompts, params)]
    final: dict[str, RequestOutput] = {}
    while any(i not in final for i in ids):
      for update in self.step():
        if update.finished:
          final[update.request_id] = update
    return [final[i] for i in ids]

  # One step.
  def step(self) -> list[RequestOutput]:
    plan = self.scheduler.schedule()
    if not plan:
      return []
    self.counters['steps'] += 1
    touched: dict[str, _Request] = {}
    if plan.prefill:
      self._run_batch([(seq, start, count) for seq, start, count in plan.prefill], touched)
    if plan.decode:
      self._run_batch([(seq, seq.computed, 1) for seq in plan.decode], touched)
    return [self._output(request) for request in touched.values()]

  def _run_batch(self, chunks: list[tuple[Sequence, int, int]], touched: dict) -> None:
    cfg = self.config
    rows = bucket(len(chunks), 1, cfg.max_seqs)
    longest = max(count for _, _, count in chunks)
    width = 1 if longest == 1 else self.scheduler.chunk_width(longest)
    pages_wide = bucket(max(len(seq.pages) for seq, _, _ in chunks), MIN_CONTEXT_BUCKET // cfg.page_size,
                         self.max_pages_per_seq)
    tokens = np.zeros((rows, width), np.int32)
    positions = np.zeros((rows, width), np.int32)
    valid = np.zeros((rows, width), bool)
    next_tokens = np.zeros((rows, width), np.int32)
    table = np.zeros((rows, pages_wide), np.int32)
    last = np.zeros((rows,), np.int32)
    temperature, top_p, top_k, min_p = (np.zeros(rows, np.float32), np.ones(rows, np.float32),
                                        np.zeros(rows, np.int32), np.zeros(rows, np.float32))
    presence, frequency = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    seeds, index = np.zeros((rows, 2), np.uint32), np.zeros(rows, np.int32)
    want_logprobs, want_prompt, penalised = 0, -1, False
    for r, (seq, start, count) in enumerate(chunks):
      p = seq.request.params
      tokens[r, :count] = seq.tokens[start:start + count]
      positions[r, :count] = np.arange(start, start + count)
      valid[r, :count] = True
      following = seq.tokens[start + 1:start + count + 1]
      next_tokens[r, :len(following)] = following
      table[r, :len(seq.pages)] = seq.pages
      last[r] = count - 1
      temperature[r], top_p[r], top_k[r], min_p[r] = p.temperature, p.top_p, p.top_k, p.min_p
      presence[r], frequency[r] = p.presence_penalty, p.frequency_penalty
      seeds[r] = (seq.seed >> 32) & 0xFFFFFFFF, seq.seed & 0xFFFFFFFF
      index[r] = len(seq.generated)
      penalised |= p.penalised
      if p.logprobs is not None:
        want_logprobs = max(want_logprobs, p.logprobs)
      if p.prompt_logprobs is not None and start < seq.num_prompt - 1 and seq.index == 0:
        want_prompt = max(want_prompt, p.prompt_logprobs)
    counts = None
    if penalised:
      counts = np.zeros((rows, self.model_config.vocab_size), np.int32)
      for r, (seq, _, _) in enumerate(chunks):
        np.add.at(counts[r], np.asarray(seq.generated, np.int64), 1)
    self.counters['batch_tokens'] += int(valid.sum())
    self.counters['batch_slots'] += rows * width
    settings = RowSettings(temperature, top_p, top_k, min_p, presence, frequency, seeds, index)
    sampled = bool(np.any(temperature > 0))
    filtered = sampled and bool(np.any((top_k > 0) | (top_p < 1) | (min_p > 0)))
    self.kv_pool, out = self._run(
        self.params, self.kv_pool, tokens, positions, valid, table, last, settings, counts, next_tokens,
        page_size=cfg.page_size, num_pages=self.pool.num_pages, kernel=self.attention, vocab_limit=int(self.vocab_limit),
        num_logprobs=logprob_bucket(want_logprobs), prompt_logprobs=(-1 if want_prompt < 0 else
                                                                     logprob_bucket(want_prompt)),
        sampled=sampled, filtered=filtered, penalised=penalised)
    out = jax.device_get(out)
    now = time.monotonic()
    for r, (seq, start, count) in enumerate(chunks):
      request = seq.request
      touched[request.request_id] = request
      seq.computed = start + count
      self.scheduler.register_pages(seq)
      if want_prompt >= 0 and request.prompt_logprobs is not None and seq.index == 0:
        self._record_prompt_logprobs(request, r, start, count, out)
      if seq.finished or seq.computed < len(seq.tokens):
        continue  # a chunk short of the end: nothing sampled yet
      if len(seq.generated) >= request.params.max_tokens:  # max_tokens=0: the prompt was scored, nothing more
        self._finish(seq, 'length')
        continue
      token = int(out['tokens'][r])
      seq.tokens.append(token)
      self.counters['generated_tokens'] += 1
      if request.first_token is None:
        request.first_token = now
      if seq.logprobs is not None:
        entry = {token: float(out['logprob'][r])}
        for t, lp in zip(out['top_ids'][r][:request.params.logprobs], out['top_logprobs'][r]):
          entry.setdefault(int(t), float(lp))
        seq.logprobs.append(entry)
      self._check_stop(seq, token)

  def _record_prompt_logprobs(self, request: _Request, r: int, start: int, count: int, out) -> None:
    k = request.params.prompt_logprobs
    for j in range(count):
      target = start + j + 1  # the prompt token that position start + j predicts
      if target >= len(request.prompt):
        break
      entry = {request.prompt[target]: float(out['prompt_logprob'][r, j])}
      for t, lp in zip(out['prompt_top_ids'][r, j][:k], out['prompt_top_logprobs'][r, j][:k]):
        entry.setdefault(int(t), float(lp))
      request.prompt_logprobs[target] = entry

  def _check_stop(self, seq: Sequence, token: int) -> None:
    p = seq.request.params
    generated = seq.generated
    if not p.ignore_eos and self.eos_id is not None and token == self.eos_id:
      return self._finish(seq, 'stop', text_tokens=generated[:-1])
    if token in p.stop_token_ids:
      return self._finish(seq, 'stop', stop_reason=token, text_tokens=generated[:-1])
    if self.tokenizer is not None:
      seq.text = self.tokenizer.decode(generated)
      for stop in p.stop:
        at = seq.text.find(stop)
        if at >= 0:
          seq.text = seq.text[:at]
          return self._finish(seq, 'stop', stop_reason=stop, text_tokens=None)
    if len(generated) >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
      self._finish(seq, 'length', text_tokens=None)

  def _finish(self, seq: Sequence, reason: str, stop_reason=None, text_tokens=None) -> None:
    seq.finish_reason, seq.stop_reason = reason, stop_reason
    if text_tokens is not None and self.tokenizer is not None:
      seq.text = self.tokenizer.decode(text_tokens)
    self.scheduler.remove(seq)
    request = seq.request
    if request.finished:
      request.finished_at = time.monotonic()
      self._requests.pop(request.request_id, None)
      self.counters['requests_finished'] += 1

  def _output(self, request: _Request) -> RequestOutput:
    completions = [CompletionOutput(seq.index, list(seq.generated), seq.text,
                                    list(seq.logprobs) if seq.logprobs is not None else None,
                                    seq.finish_reason, seq.stop_reason) for seq in request.seqs]
    metrics = dict(arrival=request.arrival, first_token=request.first_token, finished=request.finished_at)
    return RequestOutput(request.request_id, list(request.prompt),
                         list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
                         completions, request.finished, request.seqs[0].cached, metrics)


@functools.cache
def _compiled_step(model_config: TransformerConfig, rules, mesh):
  """The jitted step of one model on one mesh, shared by every engine of it (each shape compiles once)."""
  return jax.jit(functools.partial(_forward_and_sample, Transformer(model_config, decode=True), rules, mesh),
                 static_argnames=('page_size', 'num_pages', 'kernel', 'vocab_limit', 'num_logprobs',
                                  'prompt_logprobs', 'sampled', 'filtered', 'penalised'),
                 donate_argnums=(1,))


def paged_kernel(name: str, model_config: TransformerConfig, platform: str, mesh=None, rules=()) -> str:
  """EngineConfig.attention resolved once for the platform the engine runs on (or compiles for), and the mesh:
  the ragged kernel runs per device on whole heads, so its query and kv heads must split alike."""
  kernel = attention.choose_paged_kernel(name, model_config.head_dim, platform)
  if kernel == 'ragged' and mesh is not None:
    heads = nn.logical_to_mesh_axes(('act_heads',), rules)[0]
    shards = axes_size(mesh, heads)
    if (heads != nn.logical_to_mesh_axes(('act_kv_heads',), rules)[0] or model_config.num_heads % shards
        or model_config.num_kv_heads % shards):
      if name == 'auto':
        return 'xla'
      raise RequestError('engine.attention', f'ragged needs the {model_config.num_heads} query and '
                         f'{model_config.num_kv_heads} kv heads split alike over the mesh ({shards} shards of '
                         f'{heads}); use auto or xla')
  if kernel == 'ragged' and platform != 'tpu':
    raise RequestError('engine.attention', f'ragged is a Pallas TPU kernel; this engine runs on {platform} '
                       '(use auto, blocked or xla)')
  if kernel == 'ragged' and not attention.ragged_supported(model_config.head_dim):
    raise RequestError('engine.attention', f'ragged needs head_dim % 128 == 0, the model has '
                       f'{model_config.head_dim} (use auto or xla)')
  return kernel


def pool_sharding(mesh, rules, shape) -> NamedSharding:
  """One layer's kv_pages [num_pages, page_size, 2K, H] on the mesh: split over the kv heads like the attention
  (the interleaved k/v pairs stay together), replicated where the kv heads do not divide."""
  spec = jax.sharding.PartitionSpec(*nn.logical_to_mesh_axes((None, None, 'act_kv_heads', None), rules))
  if (shape[2] // 2) % axes_size(mesh, spec[2]):
    spec = jax.sharding.PartitionSpec()
  return NamedSharding(mesh, spec)


def _forward_and_sample(model, rules, mesh, params, pool, tokens, positions, valid, table, last, settings, counts,
                        next_tokens, *, page_size, num_pages, kernel, vocab_limit, num_logprobs, prompt_logprobs, sampled,
                        filtered, penalised):
  """One batch through the model over the page pool, then the sampler on each row's last token. Returns the
  updated pool and a dict of per-row results (and per-token prompt logprobs when prompt_logprobs >= 0)."""
  del penalised  # part of the compiled function's identity through `counts` being None or not
  with sharding_context(mesh, rules):
    pages = PageTable(table, page_size, num_pages, kernel)
    # every position's logits only when the prompt's logprobs are asked for; else the last token's alone
    logits_at = None if prompt_logprobs >= 0 else last[:, None]
    logits, variables = model.apply({'params': params, 'cache': pool}, tokens, valid.astype(jnp.int32),
                                    positions, pages, logits_at, mutable=['cache'])
  logits = logits.astype(jnp.float32)
  final = logits[:, 0] if logits_at is not None else jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  token, logprob, top_ids, top_logprobs = sample_rows(final, settings, counts, vocab_limit, num_logprobs,
                                                      sampled, filtered)
  out = dict(tokens=token, logprob=logprob, top_ids=top_ids, top_logprobs=top_logprobs)
  if prompt_logprobs >= 0:
    all_logprobs = jax.nn.log_softmax(logits, axis=-1)
    out['prompt_logprob'] = jnp.take_along_axis(all_logprobs, next_tokens[..., None], axis=-1)[..., 0]
    if prompt_logprobs:
      out['prompt_top_logprobs'], out['prompt_top_ids'] = jax.lax.top_k(all_logprobs, prompt_logprobs)
    else:
      shape = tokens.shape + (0,)
      out['prompt_top_logprobs'], out['prompt_top_ids'] = jnp.zeros(shape), jnp.zeros(shape, jnp.int32)
  return variables['cache'], out

