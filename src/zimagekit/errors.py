"""The one exception type that reaches a user as a one-line message.

Anything raised as :class:`ZImageKitError` is a problem with the user's input (a file, a
flag, a config) and carries a message that names the problem and the fix. The CLI prints
it without a traceback and exits non-zero; everything else is a bug and keeps its
traceback.
"""


import sys


class ZImageKitError(ValueError):
    """A user-facing error: bad input, missing file, wrong weights."""


def exit_code(run) -> int:
    """Call ``run()``; a :class:`ZImageKitError` becomes one ``error: ...`` line on stderr and
    exit status 2. Every command's ``main`` goes through here."""
    try:
        return run() or 0
    except ZImageKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
