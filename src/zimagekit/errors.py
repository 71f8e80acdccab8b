"""The one exception type that reaches a user as a one-line message.

Anything raised as :class:`ZImageKitError` is a problem with the user's input (a file, a
flag, a config) and carries a message that names the problem and the fix. The CLI prints
it without a traceback and exits non-zero; everything else is a bug and keeps its
traceback.
"""


class ZImageKitError(ValueError):
    """A user-facing error: bad input, missing file, wrong weights."""
