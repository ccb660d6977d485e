"""The OpenAI-compatible HTTP API over the serving engine: a thin FastAPI layer (request parsing, OpenAI's response
and error shapes, SSE streaming, Prometheus metrics); nothing here knows about pages or batching.

  app = make_app(AsyncEngine(engine).start(), model_name='run')      # python -m llm_jax.serve runs it

  POST /v1/completions        prompt: a text, a list of texts, token ids or a list of token-id lists; n, stop,
                              seed, logprobs (top-k per token, OpenAI's legacy shape), echo (with max_tokens=0 the
                              prompt is only scored: lm-eval's loglikelihood), stream
  POST /v1/chat/completions   messages rendered with the workdir's chat template (the tokenizer's own Jinja
                              template, else llm_jax's built-in one: llm_jax.data.sft); logprobs + top_logprobs in
                              the chat shape; stream
  GET  /v1/models, /health, /metrics (Prometheus text)
  POST /tokenize, /detokenize; GET /tokenizer_info      vLLM's, so lm-eval's `local-completions` tokenizes here

Errors are OpenAI's JSON {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON, an unknown or
ill-typed field, or a value the engine refuses (the field named in `param`, e.g. max_tokens when the prompt plus
max_tokens exceed the context); 404 for an unknown model; 429 when the engine's queue is full; 503 while shutting
down. Streams are server-sent events, `data: {chunk}` ... `data: [DONE]`. A client that disconnects (streaming or
not) aborts its requests at once, which frees their pages.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Literal, Sequence

import fastapi
import prometheus_client
import pydantic
from fastapi import responses
from fastapi.exceptions import RequestValidationError
from prometheus_client import core as prometheus_core
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_jax.data import sft
from llm_jax.errors import UserError
from llm_jax.serving.async_engine import AsyncEngine, ShuttingDownError
from llm_jax.serving.engine import QueueFullError, RequestError
from llm_jax.serving.outputs import RequestOutput
from llm_jax.serving.sampling import SamplingError, SamplingParams

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0  # tokens/s on /metrics: generated tokens over about the last this many seconds


# --- errors ----------------------------------------------------------------------------------------------------------

class APIError(Exception):
  """An error answered as OpenAI's error JSON with this status."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def body(self) -> dict:
    return {'error': {'message': self.message, 'type': self.kind, 'param': self.param, 'code': self.code}}


def _engine_error(error: BaseException) -> APIError:
  """What a request's error from the engine becomes on the wire."""
  if isinstance(error, QueueFullError):
    return APIError(429, str(error), code='queue_full', kind='rate_limit_error')
  if isinstance(error, ShuttingDownError):
    return APIError(503, str(error), code='shutting_down', kind='service_unavailable')
  if isinstance(error, RequestError):
    return APIError(400, str(error), param=error.field)
  if isinstance(error, SamplingError):  # 'field: message'
    return APIError(400, str(error), param=str(error).split(':', 1)[0])
  if isinstance(error, UserError):
    return APIError(400, str(error))
  return APIError(500, f'internal error: {error!r}', kind='internal_error')


_TYPE_TAGS = {'str', 'int', 'float', 'bool', 'list', 'dict'}  # the branch names pydantic puts in a union's error loc


def _validation_error(error: RequestValidationError) -> APIError:
  """The first problem pydantic found, naming the field (a union of types reports each branch: one is enough)."""
  first = error.errors()[0] if error.errors() else {}
  if first.get('type') == 'json_invalid':
    return APIError(400, 'the request body is not valid JSON', code='invalid_json')
  field = ''
  for part in first.get('loc', ())[1:]:  # ('body', 'messages', 0, 'role') -> messages[0].role
    if isinstance(part, int):
      field += f'[{part}]'
    elif part.isidentifier() and part not in _TYPE_TAGS:
      field += f'.{part}' if field else part
    else:  # a union's branch ('list[int]'): the field itself is what the user can fix
      break
  field = field or None
  message = 'unknown field' if first.get('type') == 'extra_forbidden' else first.get('msg', 'invalid request')
  return APIError(400, f'{field}: {message}' if field else message, param=field)


# --- requests --------------------------------------------------------------------------------------------------------

class _Strict(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='forbid')


class StreamOptions(_Strict):
  include_usage: bool = False  # a last chunk with `usage` (and no choices)


class _Sampled(_Strict):
  """Fields both endpoints take (OpenAI's, plus vLLM's top_k, min_p, stop_token_ids, ignore_eos)."""
  model: str | None = None  # the served model's name (None: that one)
  n: int | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  min_p: float | None = None
  seed: int | None = None
  stop: str | list[str] | None = None
  stop_token_ids: list[int] | None = None
  ignore_eos: bool = False
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  user: str | None = None  # accepted and ignored, as OpenAI's
  logit_bias: dict[str, float] | None = None  # refused unless empty

  def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    if self.logit_bias:
      raise APIError(400, 'logit_bias: not supported by this server', param='logit_bias')
    given = lambda value, default: default if value is None else value
    try:
      return SamplingParams(
          max_tokens=max_tokens, temperature=given(self.temperature, 1.0), top_p=given(self.top_p, 1.0),
          top_k=given(self.top_k, 0), min_p=given(self.min_p, 0.0), seed=self.seed, stop=self.stop or (),
          stop_token_ids=self.stop_token_ids or (), ignore_eos=self.ignore_eos, n=given(self.n, 1),
          logprobs=logprobs, prompt_logprobs=prompt_logprobs,
          presence_penalty=given(self.presence_penalty, 0.0), frequency_penalty=given(self.frequency_penalty, 0.0))
    except SamplingError as e:
      raise _engine_error(e) from None


class CompletionRequest(_Sampled):
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = 16
  echo: bool = False  # the prompt (its text, and its logprobs when logprobs is set) before the completion
  logprobs: int | None = None  # top logprobs per token (0: the chosen token's only)
  best_of: int | None = None  # only = n (the engine returns every completion it samples)
  suffix: str | None = None  # refused


class TextPart(_Strict):
  type: Literal['text']
  text: str


class ChatMessage(_Strict):
  role: str
  content: str | list[TextPart] | None = None
  name: str | None = None

  def text(self) -> str:
    if isinstance(self.content, list):
      return ''.join(part.text for part in self.content)
    return self.content or ''


class ChatRequest(_Sampled):
  messages: list[ChatMessage]
  max_tokens: int | None = None  # None: up to the model's context
  max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are given
  logprobs: bool = False
  top_logprobs: int | None = None


class TokenizeRequest(_Strict):
  prompt: str | None = None
  messages: list[ChatMessage] | None = None
  model: str | None = None
  add_special_tokens: bool = False  # the workdir's tokenizers add none either way


class DetokenizeRequest(_Strict):
  tokens: list[int]
  model: str | None = None


# --- token strings -----------------------------------------------------------------------------------------------------

class _Pieces:
  """The text of one token as it reads in context (decode([previous, t]) minus decode([previous]): a SentencePiece
  word's leading space is kept), for logprobs' `tokens` and `top_logprobs` keys."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, previous: int | None, token: int) -> str:
    decode = self.tokenizer.decode
    if previous is None:
      return decode([token])
    before, both = decode([previous]), decode([previous, token])
    return both[len(before):] if both.startswith(before) else decode([token])

  def run(self, tokens: Sequence[int], previous: int | None) -> list[str]:
    out = []
    for token in tokens:
      out.append(self(previous, token))
      previous = token
    return out


def _completion_logprobs(pieces: _Pieces, tokens: Sequence[int], entries: Sequence[dict | None],
                         previous: int | None, offset: int) -> dict:
  """OpenAI's legacy logprobs object of `tokens` (entries: {id: logprob} each, the chosen id first; None: unknown,
  the first prompt token)."""
  strings = pieces.run(tokens, previous)
  out = dict(tokens=strings, token_logprobs=[], top_logprobs=[], text_offset=[])
  for i, (token, entry) in enumerate(zip(tokens, entries)):
    before = tokens[i - 1] if i else previous
    out['text_offset'].append(offset)
    offset += len(strings[i])
    if entry is None:
      out['token_logprobs'].append(None)
      out['top_logprobs'].append(None)
      continue
    out['token_logprobs'].append(entry.get(token))
    top = {}
    for other, value in entry.items():
      top.setdefault(strings[i] if other == token else pieces(before, other), value)
    out['top_logprobs'].append(top)
  return out


def _chat_logprobs(pieces: _Pieces, tokens: Sequence[int], entries: Sequence[dict], previous: int | None,
                   top: int) -> list[dict]:
  """The chat shape: one {token, logprob, bytes, top_logprobs: [...]} a token."""
  out = []
  for token, entry in zip(tokens, entries):
    text = pieces(previous, token)
    ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top]
    alternatives = []
    for other, value in ranked:
      other_text = text if other == token else pieces(previous, other)
      alternatives.append(dict(token=other_text, logprob=value, bytes=list(other_text.encode())))
    out.append(dict(token=text, logprob=entry.get(token), bytes=list(text.encode()), top_logprobs=alternatives))
    previous = token
  return out


# --- metrics -----------------------------------------------------------------------------------------------------------

class _EngineCollector:
  """The engine's counters, read when /metrics is scraped; tokens/s over the last RATE_WINDOW_S seconds."""

  GAUGES = dict(waiting='requests waiting for a batch slot (the queue)', running='sequences decoding or prefilling',
                pages_used='K/V pages held by sequences', pages_total='K/V pages in the pool')
  COUNTERS = dict(prompt_tokens='prompt tokens admitted', generated_tokens='tokens generated',
                  prefix_cache_hit_tokens='prompt tokens read from the prefix cache',
                  preemptions='sequences evicted to free pages (recomputed later)',
                  batch_tokens='tokens computed by the model (prefill and decode)',
                  batch_slots='token slots of the bucketed batches they were computed in (padding included)')

  def __init__(self, engine: AsyncEngine):
    self.engine = engine
    self.samples: collections.deque = collections.deque()

  def collect(self):
    stats = self.engine.stats()
    for name, text in self.GAUGES.items():
      yield prometheus_core.GaugeMetricFamily(f'llm_jax_{name}', text, value=stats.get(name, 0))
    for name, text in self.COUNTERS.items():
      yield prometheus_core.CounterMetricFamily(f'llm_jax_{name}', text, value=stats.get(name, 0))
    now, generated = time.monotonic(), stats.get('generated_tokens', 0)
    self.samples.append((now, generated))
    while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
      self.samples.popleft()
    then, before = self.samples[0]
    rate = (generated - before) / (now - then) if now > then else 0.0
    yield prometheus_core.GaugeMetricFamily('llm_jax_generation_tokens_per_second',
                                            f'generated tokens per second over about the last {RATE_WINDOW_S:g} s '
                                            '(since the previous scrape when scraped less often)', value=rate)


class _Metrics:

  def __init__(self, engine: AsyncEngine):
    self.registry = prometheus_client.CollectorRegistry()
    self.registry.register(_EngineCollector(engine))
    self.ttft = prometheus_client.Histogram('llm_jax_time_to_first_token_seconds', 'from arrival to the first '
                                            'generated token, per prompt', buckets=TTFT_BUCKETS,
                                            registry=self.registry)
    self.latency = prometheus_client.Histogram('llm_jax_request_latency_seconds', 'from arrival to the last token, '
                                               'per prompt', buckets=TTFT_BUCKETS, registry=self.registry)
    self.finished = prometheus_client.Counter('llm_jax_requests', 'prompts finished, by finish reason',
                                              ['finish_reason'], registry=self.registry)
    self.errors = prometheus_client.Counter('llm_jax_request_errors', 'requests answered with an error, by status',
                                            ['status'], registry=self.registry)

  def render(self) -> bytes:
    return prometheus_client.generate_latest(self.registry)


# --- the app -----------------------------------------------------------------------------------------------------------

def make_app(engine: AsyncEngine, model_name: str, max_model_len: int | None = None, tokenizer: Any = None
             ) -> fastapi.FastAPI:
  """The ASGI app serving `engine` (started) as model `model_name`. The tokenizer and context length default to
  the engine's."""
  tokenizer = tokenizer if tokenizer is not None else engine.engine.tokenizer
  max_model_len = max_model_len or engine.engine.max_model_len
  pieces = _Pieces(tokenizer) if tokenizer is not None else None
  metrics = _Metrics(engine)
  app = fastapi.FastAPI(title='llm_jax', docs_url=None, redoc_url=None)
  app.state.engine, app.state.metrics = engine, metrics

  def error_response(error: APIError) -> responses.JSONResponse:
    metrics.errors.labels(str(error.status)).inc()
    return responses.JSONResponse(error.body(), status_code=error.status)

  @app.exception_handler(APIError)
  async def api_error(_, error: APIError):
    return error_response(error)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, error: RequestValidationError):
    return error_response(_validation_error(error))

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_, error: StarletteHTTPException):  # 404 of an unknown path, 405 of a wrong method
    return error_response(APIError(error.status_code, str(error.detail), code=None))

  def check_model(name: str | None) -> None:
    if name not in (None, model_name):
      raise APIError(404, f'the model {name!r} does not exist; this server serves {model_name!r}', param='model',
                     code='model_not_found')

  def need_tokenizer(field: str):
    if tokenizer is None:
      raise APIError(400, f'{field}: this model has no tokenizer; send token ids', param=field)

  def chat_prompt(messages: list[ChatMessage]) -> list[int]:
    need_tokenizer('messages')
    if not messages:
      raise APIError(400, 'messages: must not be empty', param='messages')
    turns = [dict(role=m.role, content=m.text()) for m in messages]
    if not getattr(tokenizer, 'chat_template', None):
      for i, m in enumerate(turns):
        if m['role'] not in sft.ROLES:
          raise APIError(400, f'messages[{i}].role: {m["role"]!r}; expected one of {", ".join(sft.ROLES)}',
                         param=f'messages[{i}].role')
    try:
      return sft.encode_chat_prompt(tokenizer, turns)
    except UserError as e:
      raise APIError(400, f'messages: {e}', param='messages') from None

  # --- endpoints ---
  @app.get('/health')
  async def health():
    if not engine.alive:
      raise APIError(503, f'the engine has stopped: {engine.error!r}', kind='service_unavailable')
    return {'status': 'ok'}

  @app.get('/metrics')
  async def prometheus():
    return responses.Response(metrics.render(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'created': int(app.state.started),
                                        'owned_by': 'llm_jax', 'max_model_len': max_model_len}]}

  @app.get('/tokenizer_info')
  async def tokenizer_info():
    need_tokenizer('tokenizer')
    return {'tokenizer_class': type(tokenizer).__name__, 'eos_token': getattr(tokenizer, 'eos_token', None),
            'bos_token': getattr(tokenizer, 'bos_token', None), 'pad_token': None,
            'chat_template': getattr(tokenizer, 'chat_template', None), 'model_max_length': max_model_len}

  @app.post('/tokenize')
  async def tokenize(request: TokenizeRequest):
    check_model(request.model)
    if (request.prompt is None) == (request.messages is None):
      raise APIError(400, 'prompt: give either prompt or messages', param='prompt')
    need_tokenizer('prompt')
    tokens = chat_prompt(request.messages) if request.messages is not None else tokenizer.encode(request.prompt)
    return {'tokens': tokens, 'count': len(tokens), 'max_model_len': max_model_len}

  @app.post('/detokenize')
  async def detokenize(request: DetokenizeRequest):
    check_model(request.model)
    need_tokenizer('tokens')
    return {'prompt': tokenizer.decode(request.tokens)}

  @app.post('/v1/completions')
  async def completions(request: CompletionRequest, raw: fastapi.Request):
    arrival = time.monotonic()
    check_model(request.model)
    if request.suffix:
      raise APIError(400, 'suffix: not supported by this server', param='suffix')
    if request.best_of not in (None, request.n or 1):
      raise APIError(400, 'best_of: only best_of = n is supported', param='best_of')
    prompts = _prompts(request.prompt)
    if any(isinstance(p, str) for p in prompts):
      need_tokenizer('prompt')
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    if max_tokens == 0 and not request.echo:
      raise APIError(400, 'max_tokens: 0 returns nothing without echo', param='max_tokens')
    if request.logprobs is not None:
      need_tokenizer('logprobs')
    params = request.sampling(max_tokens, request.logprobs, request.logprobs if request.echo else None)
    prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    generation = _Generation(engine, metrics, tokenizer, prompts, params, arrival)
    rid, created, n = f'cmpl-{uuid.uuid4().hex}', int(time.time()), params.n

    def logprobs_of(i: int, completion, with_prompt: bool, start: int, offset: int) -> dict | None:
      """The logprobs of completion tokens [start:] (after the prompt's when with_prompt), text offsets from
      `offset`."""
      if request.logprobs is None:
        return None
      tokens, entries = [], []
      previous = completion.token_ids[start - 1] if start else prompts[i][-1]
      if with_prompt:
        tokens, entries, previous = list(prompts[i]), list(generation.prompt_logprobs(i)), None
      tokens += completion.token_ids[start:]
      entries += completion.logprobs[start:]
      return _completion_logprobs(pieces, tokens, entries, previous, offset)

    def echoed(i: int, with_prompt: bool) -> str:
      return generation.prompt_text(i) if with_prompt else ''

    if not request.stream:
      finals = await _until_disconnected(raw, generation.finals())
      choices = [dict(index=i * n + c.index, text=echoed(i, request.echo) + c.text,
                      logprobs=logprobs_of(i, c, request.echo, 0, 0), finish_reason=c.finish_reason,
                      stop_reason=c.stop_reason)
                 for i, final in enumerate(finals) for c in final.outputs]
      return dict(id=rid, object='text_completion', created=created, model=model_name, choices=choices,
                  usage=_usage(finals))

    async def events():
      # per (prompt, completion): characters of text sent, tokens sent, characters of token strings sent, started
      sent = collections.defaultdict(lambda: [0, 0, 0, False])
      finals = {}
      async for i, update in generation.updates():
        for c in update.outputs:
          if not c.token_ids and c.finish_reason is None:
            continue  # still prefilling: the prompt's logprobs are not all known yet
          state = sent[i, c.index]
          with_prompt = request.echo and not state[3]
          text, state[0] = _new_text(c, state[0], params)
          logprobs = logprobs_of(i, c, with_prompt, state[1], state[2])
          state[1] = len(c.token_ids)
          if logprobs:
            state[2] += sum(len(t) for t in logprobs['tokens'])
          if not (text or with_prompt or c.finish_reason or (logprobs and logprobs['tokens'])):
            continue
          state[3] = True
          choice = dict(index=i * n + c.index, text=echoed(i, with_prompt) + text, logprobs=logprobs,
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason)
          yield _sse(dict(id=rid, object='text_completion', created=created, model=model_name, choices=[choice]))
        if update.finished:
          finals[i] = update
      if request.stream_options and request.stream_options.include_usage:
        yield _sse(dict(id=rid, object='text_completion', created=created, model=model_name, choices=[],
                        usage=_usage(finals.values())))

    await _until_disconnected(raw, generation.start())
    return _event_stream(events())

  @app.post('/v1/chat/completions')
  async def chat(request: ChatRequest, raw: fastapi.Request):
    arrival = time.monotonic()
    check_model(request.model)
    prompt = chat_prompt(request.messages)
    max_tokens = next((m for m in (request.max_completion_tokens, request.max_tokens) if m is not None), None)
    if max_tokens is None:
      max_tokens = max_model_len - len(prompt)
      if max_tokens < 1:
        raise APIError(400, f'messages: {len(prompt)} tokens once rendered; the model\'s context is '
                       f'{max_model_len}', param='messages')
    if request.top_logprobs is not None and not request.logprobs:
      raise APIError(400, 'top_logprobs: needs logprobs=true', param='top_logprobs')
    top = request.top_logprobs or 0
    params = request.sampling(max_tokens, top if request.logprobs else None, None)
    generation = _Generation(engine, metrics, tokenizer, [prompt], params, arrival)
    rid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())

    def logprobs_of(completion, start: int) -> dict | None:
      if not request.logprobs:
        return None
      previous = completion.token_ids[start - 1] if start else prompt[-1]
      return {'content': _chat_logprobs(pieces, completion.token_ids[start:], completion.logprobs[start:],
                                        previous, top)}

    if not request.stream:
      (final,) = await _until_disconnected(raw, generation.finals())
      choices = [dict(index=c.index, message=dict(role='assistant', content=c.text), logprobs=logprobs_of(c, 0),
                      finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in final.outputs]
      return dict(id=rid, object='chat.completion', created=created, model=model_name, choices=choices,
                  usage=_usage([final]))

    def chunk(choices, **extra) -> str:
      return _sse(dict(id=rid, object='chat.completion.chunk', created=created, model=model_name, choices=choices,
                       **extra))

    async def events():
      sent = collections.defaultdict(lambda: [0, 0])  # per completion: characters sent, tokens sent
      final = None
      yield chunk([dict(index=i, delta=dict(role='assistant', content=''), logprobs=None, finish_reason=None)
                   for i in range(params.n)])
      async for _, update in generation.updates():
        for c in update.outputs:
          state = sent[c.index]
          text, state[0] = _new_text(c, state[0], params)
          logprobs = logprobs_of(c, state[1])
          state[1] = len(c.token_ids)
          if text or c.finish_reason or (logprobs and logprobs['content']):
            yield chunk([dict(index=c.index, delta=dict(content=text) if text else {}, logprobs=logprobs,
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
        if update.finished:
          final = update
      if request.stream_options and request.stream_options.include_usage:
        yield chunk([], usage=_usage([final] if final else []))

    await _until_disconnected(raw, generation.start())
    return _event_stream(events())

  app.state.started = time.time()
  return app


# --- helpers -----------------------------------------------------------------------------------------------------------

def _prompts(prompt) -> list:
  """The request's prompts: each a text or a list of token ids."""
  if isinstance(prompt, str):
    return [prompt]
  if not prompt:
    raise APIError(400, 'prompt: must not be empty', param='prompt')
  if isinstance(prompt[0], int):
    return [list(prompt)]
  return list(prompt)


def _usage(finals) -> dict:
  finals = list(finals)
  prompt = sum(len(f.prompt_token_ids) for f in finals)
  completion = sum(len(c.token_ids) for f in finals for c in f.outputs)
  return dict(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _new_text(completion, sent: int, params: SamplingParams) -> tuple[str, int]:
  """The text of `completion` not streamed yet, and the new count of characters sent. While it runs, the last
  len(longest stop string) - 1 characters are held back (a stop string may be forming there and would be cut),
  and so is a trailing U+FFFD (a character whose bytes have not all arrived)."""
  text = completion.text
  end = len(text)
  if completion.finish_reason is None:
    if params.stop:
      end -= max(len(s) for s in params.stop) - 1
    while end > sent and text[end - 1] == '\ufffd':
      end -= 1
  if end <= sent:
    return '', sent
  return text[sent:end], end


def _sse(payload: dict) -> str:
  return f'data: {json.dumps(payload, ensure_ascii=False)}\n\n'


async def _until_disconnected(raw: fastapi.Request, work):
  """`await work`, cancelled (its requests aborted) when the client goes away first."""
  task = asyncio.ensure_future(work)

  async def gone():
    while True:
      message = await raw.receive()
      if message['type'] == 'http.disconnect':
        return

  watcher = asyncio.ensure_future(gone())
  try:
    await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
  finally:
    watcher.cancel()
  if not task.done():
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise APIError(499, 'client disconnected', code='client_closed_request')
  return task.result()


def _event_stream(events: AsyncIterator[str]) -> responses.StreamingResponse:
  """Server-sent events, then `data: [DONE]`; an error after the stream began (another prompt of the request
  refused, the engine failed) is an `error` event before [DONE]. A client that goes away cancels the stream
  (Starlette), which aborts its engine requests."""

  async def body():
    try:
      async for event in events:
        yield event
    except APIError as error:
      yield _sse(error.body())
    yield 'data: [DONE]\n\n'

  return responses.StreamingResponse(body(), media_type='text/event-stream', headers={'Cache-Control': 'no-cache'})


class _Generation:
  """The engine requests of one HTTP request (one per prompt, each with the request's n), merged. `start()` waits
  for the first update, so that a request the engine refuses is still an HTTP error before a stream begins."""

  def __init__(self, engine: AsyncEngine, metrics: _Metrics, tokenizer, prompts: list[list[int]],
               params: SamplingParams, arrival: float):
    self.engine, self.metrics, self.tokenizer = engine, metrics, tokenizer
    self.prompts, self.params, self.arrival = prompts, params, arrival
    self._prompt_logprobs: dict[int, list] = {}
    self._iterator = None
    self._first = None

  def prompt_logprobs(self, i: int) -> list:
    return self._prompt_logprobs.get(i) or [None] * len(self.prompts[i])

  def prompt_text(self, i: int) -> str:
    return self.tokenizer.decode(self.prompts[i])

  async def start(self) -> None:
    self._iterator = self._merged()
    self._first = await self._iterator.__anext__()

  async def updates(self) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, update) as the engine moves them; an error of any prompt ends it (the others are aborted)."""
    if self._iterator is None:
      await self.start()
    try:
      yield self._first
      async for item in self._iterator:
        yield item
    finally:
      await self._iterator.aclose()

  async def finals(self) -> list[RequestOutput]:
    finals: list = [None] * len(self.prompts)
    async for i, update in self.updates():
      if update.finished:
        finals[i] = update
    return finals

  async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
    queue: asyncio.Queue = asyncio.Queue()
    first_token = [False] * len(self.prompts)

    async def pump(i: int, prompt: list[int]):
      try:
        async for update in self.engine.generate(prompt, dataclasses.replace(self.params)):
          queue.put_nowait((i, update, None))
        queue.put_nowait((i, None, None))
      except asyncio.CancelledError:
        raise
      except Exception as error:  # noqa: BLE001 - the request's own error, raised to the caller below
        queue.put_nowait((i, None, error))

    tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(self.prompts)]
    try:
      remaining = len(tasks)
      while remaining:
        i, update, error = await queue.get()
        if error is not None:
          raise _engine_error(error)
        if update is None:
          remaining -= 1
          continue
        if update.prompt_logprobs is not None:
          self._prompt_logprobs[i] = update.prompt_logprobs
        now = time.monotonic()
        if not first_token[i] and any(c.token_ids for c in update.outputs):
          first_token[i] = True
          self.metrics.ttft.observe(now - self.arrival)
        if update.finished:
          self.metrics.latency.observe(now - self.arrival)
          for c in update.outputs:
            self.metrics.finished.labels(c.finish_reason or 'none').inc()
        yield i, update
    finally:
      for task in tasks:
        task.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
