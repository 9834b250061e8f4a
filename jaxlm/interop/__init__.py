"""Hugging Face interop: `jaxlm import` (hf_import.py) and `jaxlm export` (hf_export.py) of GPT-2 and Llama
checkpoints, through one table of tensor rules (layouts.py) and a numpy-only safetensors reader and writer."""
