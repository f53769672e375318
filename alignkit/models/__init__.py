"""Where models come from: local folders, GGUF files and the embedded default."""

from alignkit.models.load import load_model, load_tokenizer, resolve_model

__all__ = ["load_model", "load_tokenizer", "resolve_model"]
