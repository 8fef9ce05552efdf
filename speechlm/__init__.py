"""speechlm: connect a pretrained speech encoder to a frozen LLM through an alignment-aware SSR connector."""

__version__ = "0.1.0"
