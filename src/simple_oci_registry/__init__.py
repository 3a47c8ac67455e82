"""Simple OCI Registry: a read-only OCI distribution registry backed by image archives on disk."""

__all__ = ["__version__"]

__version__ = "0.1.0"
