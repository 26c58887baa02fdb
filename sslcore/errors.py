"""User mistakes get one clear line, not a traceback.

Every entry point (recipes, `python -m textssl.word2vec`, benchmarks) runs its `main` through
`run_cli`. An error that is the user's to fix -- a `UserError`, or a class registered with
`register_user_error` -- is printed as ONE line on stderr (`config error: ...`, `checkpoint error: ...`)
and the process exits with status 2. Anything else is a bug of ours and keeps its traceback.
`--debug` on the command line, or `SELFSUP_DEBUG=1`, shows the traceback of user errors too.

    from sslcore.errors import UserError, run_cli

    class CorpusError(UserError, ValueError): ...   # subclass, or register_user_error(CorpusError)

    if __name__ == "__main__":
        run_cli(main)
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2
"""Exit status of a user error (argparse's, for a bad command line)."""
DEBUG_FLAG = "--debug"
DEBUG_ENV = "SELFSUP_DEBUG"


class UserError(Exception):
    """Base of the errors a user fixes by changing what they asked for (a config value, a path, a login).
    The message names the problem and the fix; entry points print it as one line."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist, or is not the kind expected."""


_REGISTERED: list[type[BaseException]] = []


def register_user_error(*classes: type[BaseException]) -> None:
    """Treat these exception classes (defined where `UserError` cannot be their base) as user errors."""
    for klass in classes:
        if klass not in _REGISTERED:
            _REGISTERED.append(klass)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, (UserError, *_REGISTERED))


def _label(error: BaseException) -> str:
    """`ConfigError` -> `config error`; a plain UserError -> `error`."""
    name = type(error).__name__
    if name in ("UserError", "MissingPathError"):
        return "error"
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", name.removesuffix("Error")).lower()
    return f"{words} error" if words else "error"


def user_error_line(error: BaseException) -> str:
    """The error as one line: `<kind> error: <message>` with the message's line breaks folded."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError) and message.startswith(("'", '"')):
        message = message[1:-1]  # KeyError's str() adds quotes
    return f"{_label(error)}: {message}"


def debug_requested(argv: list[str] | None = None) -> bool:
    return DEBUG_FLAG in (argv or []) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_cli(main: Callable[[list[str]], T], argv: list[str] | None = None) -> T:
    """Run `main(argv)` (argv without `--debug`); a user error becomes one stderr line and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        return main(argv)
    except BrokenPipeError:  # `... --help | head`: the reader left; nothing to report
        sys.stderr.close()
        raise SystemExit(0) from None
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        print(user_error_line(error), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        from sslcore.distributed import release_process_group

        release_process_group()  # the launch's group lives as long as its entry point, not one run


DEBUG_HELP = (f"{DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the traceback of an error; without it a mistake in the "
              "command line, config or paths prints one line and exits with status 2")


__all__ = ["DEBUG_HELP", "EXIT_USER_ERROR", "MissingPathError", "UserError", "debug_requested", "is_user_error",
           "register_user_error", "run_cli", "user_error_line"]
