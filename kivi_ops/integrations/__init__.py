"""Bridges from kivi_ops to other libraries (transformers, torchao). Each imports its library lazily."""
