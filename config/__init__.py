"""Configuration: the one typed Settings object."""
from config.settings import Settings

__all__ = ["Settings"]
