"""The one marker class of errors a user can cause (bad config, missing file, malformed line, wrong tokenizer).

ConfigError (a config field) lives here too; other modules keep their own error classes (SourceError,
ConversionError, ...), which also derive from UserError; the
command-line jobs print such an error as one line, `error: <message>`, and keep tracebacks for real bugs.
"""

import contextlib


class UserError(Exception):
  """An error the user can fix; its message names the field, file or line."""


class ConfigError(UserError, ValueError):
  """A config field has a value that cannot work; the message names the field. Here, at the bottom of the house,
  so that every part that validates its own fields (data/, model/, objectives/, ...) raises it without importing
  config."""


@contextlib.contextmanager
def exit_on_user_error():
  """For the command-line jobs: a UserError (or a missing file) ends the program with one line,
  `error: <message>`, and exit status 1; any other exception keeps its traceback (it is a bug)."""
  try:
    yield
  except (UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None


def fail(field: str, message: str):
  """Raises ConfigError for `config.<field>`: the one message shape every part's config check uses."""
  raise ConfigError(f'config.{field}: {message}')


def check_choice(field: str, value, choices) -> None:
  """`value` of config.<field> must be one of `choices` (a part's registry: its keys are the names)."""
  if value not in choices:
    fail(field, f'unknown value {value!r}; expected one of {", ".join(choices)}')
