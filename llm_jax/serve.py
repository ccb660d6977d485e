"""Serve a workdir's checkpoint over an OpenAI-compatible HTTP API (llm_jax.openai_server on the serving engine):

  python -m llm_jax.serve --workdir=DIR [--host=127.0.0.1] [--port=8000] [--model_name=NAME] [--step=S]
      [--page_size=16 --num_pages=0 --max_seqs=32 --max_queue=4096 ...]     every EngineConfig field is a flag

Loads the newest intact checkpoint (or --step) and the tokenizer of the workdir (a Hugging Face model: through
`python -m llm_jax.convert from_hf` first), starts the engine on its own thread and uvicorn on host:port, and
prints one line, `serving MODEL on http://HOST:PORT`, once it accepts requests. The model is called --model_name
(default: the workdir's directory name) in the API. SIGTERM or Ctrl-C: stop admitting (a new request is answered
503), finish every request already running, exit 0. Needs the `serve` extra (fastapi, uvicorn, prometheus_client).
`run()` does the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys

from llm_jax import cli
from llm_jax.errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ServeError(UserError, RuntimeError):
  """The server cannot start (a missing extra, a port in use); the message says which."""


def engine_fields() -> list[tuple[str, type, object, str]]:
  """(name, type, default, comment) of each EngineConfig field, read from its declaration in serving/engine.py
  without importing it (jax): the flags are made from them, so a field is declared once, in the engine."""
  import ast
  import pathlib
  source = (pathlib.Path(__file__).parent / 'serving' / 'engine.py').read_text()
  lines = source.splitlines()
  (config,) = [node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)
               and node.name == 'EngineConfig']
  fields = []
  for node in config.body:
    if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
      continue
    comment, row = [], node.lineno - 1
    text = lines[row].split('#', 1)[1].strip() if '#' in lines[row] else ''
    while text:
      comment.append(text)
      row += 1
      following = lines[row].strip() if row < len(lines) else ''
      text = following[1:].strip() if following.startswith('#') else ''
    kinds = dict(int=int, float=float, bool=bool, str=str)
    fields.append((node.target.id, kinds[ast.unparse(node.annotation)], ast.literal_eval(node.value),
                   ' '.join(comment)))
  return fields


def run(workdir: str, host: str = '127.0.0.1', port: int = 8000, model_name: str | None = None,
        step: int | None = None, **engine_settings) -> None:
  """Serve until SIGTERM or Ctrl-C; `engine_settings` are EngineConfig fields."""
  try:
    import uvicorn
    from llm_jax import openai_server
  except ImportError as e:
    raise ServeError(f'the server needs the serve extra ({e.name} is missing): pip install "llm_jax[serve]"') from None
  from llm_jax.serving.async_engine import AsyncEngine
  from llm_jax.serving.engine import Engine, EngineConfig

  engine = Engine.from_workdir(workdir, config=EngineConfig(**engine_settings), step=step, model_name=model_name)
  engine_thread = AsyncEngine(engine).start()
  app = openai_server.make_app(engine_thread, engine.model_name)
  server = _make_server_class()(uvicorn.Config(app, host=host, port=port, log_level='warning', lifespan='off',
                                                  timeout_graceful_shutdown=None),
                   stop_admitting=lambda: setattr(engine_thread, 'accepting', False),
                   ready=f'serving {engine.model_name} on http://{host}:{port}')
  server.run()
  if not server.started:
    raise ServeError(f'--host={host} --port={port}: cannot listen there (in use, or not an address of this '
                     'machine)')
  import asyncio
  asyncio.run(engine_thread.shutdown(drain=True))  # uvicorn has waited for every open request to finish


def _make_server_class():
  import uvicorn

  class Server(uvicorn.Server):
    """uvicorn's server whose SIGTERM / Ctrl-C first stops the engine admitting, then shuts down gracefully
    (uvicorn waits for the open requests), and which then returns, so the process exits 0: uvicorn's own handler
    re-raises the signal after shutting down, which would end the process with -SIGTERM."""

    def __init__(self, config, stop_admitting, ready: str):
      super().__init__(config)
      self._stop_admitting, self._ready = stop_admitting, ready

    async def startup(self, sockets=None):
      await super().startup(sockets)
      if self.started:
        print(self._ready, flush=True)

    @contextlib.contextmanager
    def capture_signals(self):
      previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
      try:
        yield
      finally:
        for sig, handler in previous.items():
          signal.signal(sig, handler)

    def handle_exit(self, sig, frame):
      self._stop_admitting()
      if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: stop without waiting
        self.force_exit = True
      self.should_exit = True

  return Server


def _main():
  """The command line. Flags are defined here, not at import, so that tests can import every job together."""
  from absl import app, flags

  workdir = flags.DEFINE_string('workdir', None, 'Training workdir: its newest intact checkpoint and tokenizer are '
                                'served; nothing is written to it.')
  host = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: every interface).')
  port = flags.DEFINE_integer('port', 8000, 'TCP port to listen on.')
  model_name = flags.DEFINE_string('model_name', None, 'The model\'s name in the API (`model` of a request); '
                                   'default: the workdir\'s directory name.')
  step = flags.DEFINE_integer('step', None, 'Checkpoint step to serve (default: the newest intact one).')
  define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool, str: flags.DEFINE_string}
  engine_flags = {name: define[kind](name, default, f'Engine: {comment}') for name, kind, default, comment
                  in engine_fields()}

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not workdir.value:
      raise app.UsageError('--workdir is required')
    run(workdir.value, host.value, port.value, model_name.value, step.value,
        **{name: holder.value for name, holder in engine_flags.items()})

  cli.run(main)


if __name__ == '__main__':
  _main()
