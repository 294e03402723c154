"""Readers of corpora and training pairs, shared by the index builder and fine-tuning."""
