"""Quiver: optimize a checkpoint, serve it, front it with a gateway, deploy, load-test, watch."""

from common import __version__

__all__ = ["__version__"]
