"""The engine on a background thread, for asyncio callers (the OpenAI server): requests in, updates out.

  engine = AsyncEngine(Engine(...)); engine.start()
  async for update in engine.generate(prompt, SamplingParams(...)):   # RequestOutput after each step it moved
      ...                                   # leaving the loop early (a client gone) aborts the request at once
  await engine.shutdown()                   # stop admitting, finish what runs, stop the thread

One thread owns the Engine (it is not thread-safe): it takes new requests and aborts from a queue between steps,
runs `Engine.step()` while there is work and sleeps on the queue when there is none. Updates go back to each
request's asyncio.Queue through its event loop (call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import AsyncIterator, Sequence

from llm_jax.errors import UserError
from llm_jax.serving.engine import Engine
from llm_jax.serving.outputs import RequestOutput
from llm_jax.serving.sampling import SamplingParams


class ShuttingDownError(UserError, RuntimeError):
  """The engine no longer admits requests (shutdown has begun)."""


class AsyncEngine:

  def __init__(self, engine: Engine):
    self.engine = engine
    self.accepting = True
    self._inbox: queue.Queue = queue.Queue()
    self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
    self._ids = itertools.count()
    self._thread = threading.Thread(target=self._run, name='llm_jax-engine', daemon=True)
    self._stop = threading.Event()
    self.error: BaseException | None = None  # set if the engine thread died

  def start(self) -> 'AsyncEngine':
    self._thread.start()
    return self

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and self.error is None

  def stats(self) -> dict:
    return self.engine.stats()

  async def generate(self, prompt: Sequence[int] | str, params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
    """Updates of one request until it finishes. Errors of the request itself (a prompt too long, a full queue)
    are raised here, before the first update."""
    if not self.accepting:
      raise ShuttingDownError('the server is shutting down and admits no new requests')
    request_id = request_id or f'req-{next(self._ids)}'
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    admitted: asyncio.Future = loop.create_future()
    self._listeners[request_id] = (loop, updates)
    self._inbox.put(('add', request_id, prompt, params, (loop, admitted)))
    finished = False
    try:
      await admitted  # raises the engine's error for this request (RequestError, QueueFullError)
      while True:
        update = await updates.get()
        if isinstance(update, BaseException):
          raise update
        yield update
        if update.finished:
          finished = True
          return
    finally:
      self._listeners.pop(request_id, None)
      if not finished:  # the caller left early (client disconnected, cancelled): free its pages now
        self._inbox.put(('abort', request_id))

  async def shutdown(self, drain: bool = True) -> None:
    """Stop admitting; with drain, wait until every running request has finished; then stop the thread."""
    self.accepting = False
    while drain and self.alive and (self.engine.has_unfinished() or not self._inbox.empty()):
      await asyncio.sleep(0.05)
    self._stop.set()
    self._inbox.put(('wake',))
    await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

  # The engine thread.
  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        self._take_inbox(block=not self.engine.has_unfinished())
        if self.engine.has_unfinished():
          for update in self.engine.step():
            self._send(update.request_id, update)
    except BaseException as error:  # the engine broke: fail every waiting caller instead of hanging them
      self.error = error
      for request_id in list(self._listeners):
        self._send(request_id, RuntimeError(f'engine failed: {error!r}'))
      raise

  def _take_inbox(self, block: bool) -> None:
    try:
      item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
    except queue.Empty:
      return
    while True:
      self._handle(item)
      try:
        item = self._inbox.get_nowait()
      except queue.Empty:
        return

  def _handle(self, item) -> None:
    if item[0] == 'add':
      _, request_id, prompt, params, (loop, admitted) = item
      try:
        self.engine.add_request(prompt, params, request_id)
      except Exception as error:  # noqa: BLE001 - handed to the caller, who raises it
        loop.call_soon_threadsafe(_settle, admitted, error)
        return
      loop.call_soon_threadsafe(_settle, admitted, None)
    elif item[0] == 'abort':
      self.engine.abort(item[1])

  def _send(self, request_id: str, update) -> None:
    listener = self._listeners.get(request_id)
    if listener is not None:
      loop, updates = listener
      try:
        loop.call_soon_threadsafe(updates.put_nowait, update)
      except RuntimeError:  # that event loop is closed
        pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
  if future.done():
    return
  if error is None:
    future.set_result(None)
  else:
    future.set_exception(error)
