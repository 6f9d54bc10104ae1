"""The one exception type users see: a clear, one-line message, no traceback by default."""


class OuzelError(Exception):
    """A problem with the user's input (file, model, request, option), stated in one line."""


class UnsupportedError(OuzelError):
    """The input is valid but names something ouzel cannot run (architecture, block type, device)."""
