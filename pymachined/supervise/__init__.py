"""Supervisors: ``base`` (the interface and its data), ``builtin`` (pymachined)."""
