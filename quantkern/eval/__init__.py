"""Evaluation: perplexity (+ an lm-eval adapter that imports lm_eval lazily)."""
from .perplexity import perplexity  # noqa: F401
