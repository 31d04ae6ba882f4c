"""kvshrink.convert: checkpoint IO, model-family specs and KV-head conversion methods."""

from kvshrink.convert.errors import KvshrinkError

__version__ = "0.1.0"

__all__ = ["KvshrinkError", "__version__"]
