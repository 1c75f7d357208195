"""Control-plane registry for agent workspaces."""

__version__ = "0.1.0"
