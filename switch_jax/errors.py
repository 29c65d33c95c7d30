"""Errors that name what the user got wrong and how to fix it.

The CLI prints these as one line, without a stack trace; anything else is a
bug and keeps its traceback.
"""


class UserError(ValueError):
  """Bad input: a config, a path, a file or a flag the user supplied."""


class ConfigError(UserError):
  """A model, mesh or run configuration that cannot work."""


class SplitNotBoundError(UserError):
  """A split whose data the user never named (say `local_files.validation`):
  training runs on without evaluation, anything else fails."""
