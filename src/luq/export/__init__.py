"""Exports of a luq artifact to other runtimes' formats (GGUF for llama.cpp)."""

from luq.export.gguf import export_gguf

__all__ = ["export_gguf"]
