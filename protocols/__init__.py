"""Weft protocol core: pure, synchronous, no I/O, no clock, no randomness.

State plus input gives new state plus effects. See SPEC.md beside this file.
"""
