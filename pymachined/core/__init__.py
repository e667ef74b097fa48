"""The pure core: specs, plans, rendering and parsing as data in, data out.

Nothing here runs a process, writes a file, or reads the clock or the
environment (the import contract in pyproject.toml forbids it, directly and
indirectly); the edges around it do.
"""
