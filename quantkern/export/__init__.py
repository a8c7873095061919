"""Exports of quantkern checkpoints to other runtimes' formats (quantkern.export.gguf: llama.cpp)."""
