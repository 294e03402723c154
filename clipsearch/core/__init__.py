"""What the service, the index builder and fine-tuning share: the model seam, image decoding,
the index format and search, typed errors and atomic file writes. Nothing here imports
FastAPI, the service, the builder or fine-tuning."""
