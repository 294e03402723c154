"""Index versions on disk (format, manifest, items, thumbnails), metadata filters and search."""
