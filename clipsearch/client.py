"""The Python client, as `clipsearch.client`: the `clipsearch-client` distribution, which the
service depends on and which installs alone without torch (`import clipsearch_client`)."""

from clipsearch_client import *  # noqa: F403  (the same names, one list: clipsearch_client.__all__)
from clipsearch_client import __all__  # noqa: F401
