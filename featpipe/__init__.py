"""featpipe: cached frozen-backbone embeddings, heads in seconds, and the experiment that proves it."""

__version__ = "0.1.0"
