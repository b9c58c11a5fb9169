"""Weft node runtime (trio shell around `protocols`)."""
