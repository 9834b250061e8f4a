"""jaxlm: transformer language models in JAX/Flax NNX, from a laptop CPU to a pod."""

__version__ = "0.1.0"
