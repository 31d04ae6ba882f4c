"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class KvshrinkError(Exception):
    """A problem with the user's input, stated as: what is wrong, then what to do about it."""
