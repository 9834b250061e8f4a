"""Flax NNX transformer models; every parameter carries logical axis names."""
