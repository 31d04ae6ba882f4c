"""kvshrink.convert: checkpoint IO, model-family specs and KV-head conversion methods."""

from importlib.metadata import version

from kvshrink.convert.errors import KvshrinkError

__version__ = version("kvshrink")

__all__ = ["KvshrinkError", "__version__"]
