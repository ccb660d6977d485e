"""The one marker class of errors a user can cause (bad config, missing file, malformed line, wrong tokenizer).

Each module keeps its own error class (ConfigError, SourceError, ...), which also derives from UserError; the
command-line jobs print such an error as one line, `error: <message>`, and keep tracebacks for real bugs.
"""


class UserError(Exception):
  """An error the user can fix; its message names the field, file or line."""
