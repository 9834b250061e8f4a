"""Tokenizers, corpora (files and the built-in fairy tales) and batch iterators."""
