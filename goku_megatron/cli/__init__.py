"""The command-line entry points (setup.py's console scripts), one module per command.

Each command parses its arguments, calls ``goku_megatron.logs.setup_logging`` and turns the
library's one-line errors (``config.ConfigError`` and its kind) into resilience.EXIT_* codes. The
work itself lives in the library modules they call; nothing else imports this package.
"""
