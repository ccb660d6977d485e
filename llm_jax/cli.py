"""The one way every command-line job starts: `cli.run(main)` in place of absl's `app.run(main)`.

What the user sees is the job's output and, when something is wrong, one line:

  quiet        absl logs at WARNING unless --verbosity is given (orbax and jax log every save and restore at
               INFO; absl itself would switch to INFO after parsing)
  user errors  a UserError or missing file raised by main: `error: <message>`, exit 1 (errors.exit_on_user_error);
               app.UsageError (a required flag missing, stray arguments) likewise, without absl's usage page
  Ctrl-C       `interrupted`, exit 130, no traceback (training saves first: train.Preemption)
  flags        a mistake in a flag or a config file, `error: <flag>: <what>`, exit 1, with ml_collections' or
               absl's suggestion when there is one:
                 error: --config.train.stepz: config.train has no field 'stepz'; did you mean 'steps'?
                 error: --config=experiments/nope.py: cannot load it: No such file or directory
                 error: --config=x.py: the file defines no get_config()
                 error: Unknown command line flag 'stepz'. Did you mean: steps ?
  platforms    on a host without an accelerator, jax is held to the CPU before its backends start, so the CUDA
               plugin and libtpu of the test extras print no traceback or complaint first (platforms.quiet_start;
               nothing changes where JAX_PLATFORMS is set or a GPU or TPU is present)

Anything else keeps its traceback: it is a bug. Flags stay defined by each job (at import for main and
benchmark, inside `_main` for the others so tests can import every job together).
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Callable, Sequence

from llm_jax import platforms
from llm_jax.errors import exit_on_user_error

_SUGGESTION = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"\?')


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
  """absl's app.run with the handling above; `main(argv)` receives the arguments left after the flags."""
  from absl import app
  platforms.quiet_start()
  app.run(_wrapped(main), argv=list(argv) if argv is not None else None, flags_parser=parse_flags)


def _wrapped(main):
  def job(argv):
    from absl import app, flags, logging
    if not flags.FLAGS['verbosity'].present:  # orbax and jax log every save and restore at INFO
      logging.set_verbosity(logging.WARNING)
    try:
      with exit_on_user_error():
        return main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first): no traceback
      print('interrupted', file=sys.stderr, flush=True)
      return 130
    except app.UsageError as e:
      raise SystemExit(f'error: {e}') from None
    except OSError as e:  # a config file that failed to load surfaces on first use (ml_collections defers it)
      message = config_file_mistake(e, sys.argv)
      if message is None:
        raise
      raise SystemExit(f'error: {message}') from None
  return job


def parse_flags(argv: list[str]) -> list[str]:
  """FLAGS(argv), with each mistake ending the program as one line (see the module docstring)."""
  from absl import flags
  with flag_mistakes_as_one_line(argv):
    remaining = flags.FLAGS(argv)
    for name in _config_flag_names():
      _touch(flags.FLAGS[name].value)  # a config file that failed to load raises its IOError here
    return remaining


def define_config_dict(name: str, default, help_string: str):
  """config_flags.DEFINE_config_dict, whose overrides are parsed when it is defined (from sys.argv): a misspelt
  --name.a.b=v there is one line too."""
  from ml_collections import config_flags
  with flag_mistakes_as_one_line(sys.argv):
    return config_flags.DEFINE_config_dict(name, default, help_string)


@contextlib.contextmanager
def flag_mistakes_as_one_line(argv: Sequence[str]):
  from absl import flags
  try:
    yield
  except flags.Error as e:
    text = str(e)
    if 'Error whilst parsing config file' not in text:  # a bug inside get_config keeps its traceback text
      text = text.strip().splitlines()[0]
    raise SystemExit(f'error: {text}') from None
  except (KeyError, AttributeError, OSError) as e:
    message = override_mistake(e, argv) or config_file_mistake(e, argv)
    if message is None:
      raise
    raise SystemExit(f'error: {message}') from None


def _config_flag_names() -> list[str]:
  from absl import flags
  return [name for name, flag in flags.FLAGS._flags().items()  # pylint: disable=protected-access
          if type(flag).__name__ == '_ConfigFlag' and name == flag.name]


def _touch(value) -> None:
  if value is not None and type(value).__name__ == '_ErrorConfig':
    value.lock()  # raises the deferred IOError


def _flag_argument(argv: Sequence[str], name: str) -> str:
  """`--name=value` as the user typed it (or `--name value`), for the error line."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg
    if arg == f'--{name}' and i + 1 < len(argv):
      return f'--{name}={argv[i + 1]}'
  return f'--{name}'


def override_mistake(error: BaseException, argv: Sequence[str]) -> str | None:
  """`--config.a.b=v` naming a field the config does not have: the flag, and ml_collections' suggestion."""
  if not isinstance(error, (KeyError, AttributeError)):
    return None
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  lines = text.strip().strip('\'"').replace('\\n', '\n').splitlines()
  if not lines:
    return None
  key = lines[0].strip('\'"\\ ')
  for arg in argv[1:]:
    if not arg.startswith('--') or '.' not in arg:
      continue
    path = arg[2:].split('=', 1)[0]
    parts = path.split('.')
    if key in parts[1:]:
      parts = parts[:parts.index(key, 1) + 1]
      parent = '.'.join(parts[:-1])
      match = _SUGGESTION.search(text.replace('\\"', '"'))
      hint = f"; did you mean '{match.group(1)}'?" if match else ''
      return f'--{".".join(parts)}: {parent} has no field {key!r}{hint}'
  return None


def config_file_mistake(error: BaseException, argv: Sequence[str]) -> str | None:
  """A config file that does not exist, cannot be read, or defines no get_config()."""
  text = str(error)
  if isinstance(error, AttributeError):
    match = re.search(r"module '(\w+)_config' has no attribute 'get_config'", text)
    if match:
      return f'{_flag_argument(argv, match.group(1))}: the file defines no get_config()'
    return None
  match = re.search(r'Failed loading config file (\w+)_config', text)
  if not match:
    return None
  reason = re.findall(r'\[Errno \d+\] ([^:\n]+)', text)
  why = reason[-1] if reason else text.strip().splitlines()[-1].strip()
  return f'{_flag_argument(argv, match.group(1))}: cannot load it: {why}'
