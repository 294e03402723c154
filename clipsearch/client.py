"""The Python client, as `clipsearch.client`: the `clipsearch-client` distribution, which the
service depends on and which installs alone without torch (`import clipsearch_client`)."""

from clipsearch_client import (
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
