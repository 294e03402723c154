"""The one seam to the model: spec resolution, loading (open_clip and transformers families),
tokenizers, encoding, CUDA graphs, zero-shot prompts."""
