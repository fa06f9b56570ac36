"""The one exception type that means "the user gave us something we cannot use"."""


class VrestoreError(Exception):
    """A user-facing error. The CLI prints its message on one line, without a
    traceback, and exits non-zero; messages name the file and the problem."""
