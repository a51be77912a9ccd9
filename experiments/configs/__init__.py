"""Configs: one experiment per file, each overriding :mod:`base` (``--config=FILE[:tiny]``)."""
