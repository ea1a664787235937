"""Quiver: optimize a checkpoint, serve it, front it with a gateway, deploy, load-test, watch."""

__version__ = "0.1.0"
