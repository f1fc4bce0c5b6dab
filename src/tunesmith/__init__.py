"""tunesmith: fine-tune chat LLMs end to end."""

__version__ = "0.1.0"
