"""Image bytes to model input: base64 and data: URIs, header checks, decoding, thumbnails."""
