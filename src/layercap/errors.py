"""The one exception type users see: a message that says what is wrong and how to fix it."""


class LayercapError(ValueError):
    """Bad input or an impossible request. The CLI prints it without a traceback and exits 2."""
