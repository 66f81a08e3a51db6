"""Offline datasets that packages ship (read by kdpipe/sources.py)."""
