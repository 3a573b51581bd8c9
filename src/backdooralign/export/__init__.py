"""Export of a model whose chat template injects the secret itself (transformers, vLLM, GGUF)."""
