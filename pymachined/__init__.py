"""pymachine: a declarative manager for systemd-nspawn machines."""

__version__ = "0.1.0"
