"""jaxlm: transformer language models in JAX/Flax NNX, from a laptop CPU to a pod.

The notebook API (api.py) is importable from here: `jaxlm.load_config`, `jaxlm.fit`, `jaxlm.load`,
`jaxlm.import_hf`.
It is imported on first use, so `import jaxlm` (and the CLI) does not start JAX.
"""

__version__ = "0.1.0"
__all__ = ["Run", "fit", "import_hf", "load", "load_config"]


def __getattr__(name: str):
  if name in __all__:
    from jaxlm import api

    return getattr(api, name)
  raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
