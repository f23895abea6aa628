"""pipeserve: a Hugging Face transformers pipeline behind HTTP, in a separate batching process."""

__version__ = "0.1.0"
