"""trainrun: a config-driven command-line runner that trains Transformer models."""

__version__ = "0.1.0"
