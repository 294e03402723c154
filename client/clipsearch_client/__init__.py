"""A Python client for a clipsearch server: `Client` (blocking) and `AsyncClient` (asyncio).

It needs httpx and numpy only (Pillow if you pass PIL images), so it installs without
torch, FastAPI or FAISS: `pip install clipsearch-client`.
"""

from clipsearch_client.client import (
    RETRY_STATUSES,
    APIError,
    AsyncClient,
    Client,
    Hit,
    ImageInput,
    LabelScore,
    SearchResults,
    Similarity,
)

__all__ = ["RETRY_STATUSES", "APIError", "AsyncClient", "Client", "Hit", "ImageInput", "LabelScore",
           "SearchResults", "Similarity"]
__version__ = "0.1.0"
