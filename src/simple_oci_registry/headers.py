"""Header names and fixed values of the distribution API, named once."""

from __future__ import annotations

from typing import Final

__all__ = ["API_VERSION", "API_VERSION_VALUE", "CONTENT_DIGEST", "FILTERS_APPLIED"]

API_VERSION: Final = "Docker-Distribution-API-Version"
API_VERSION_VALUE: Final = "registry/2.0"
CONTENT_DIGEST: Final = "Docker-Content-Digest"
FILTERS_APPLIED: Final = "OCI-Filters-Applied"
