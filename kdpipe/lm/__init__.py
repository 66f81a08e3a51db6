"""Causal language-model distillation: token-level teacher caches, teacher pre-training, losses."""
