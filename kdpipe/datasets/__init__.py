"""Offline datasets that packages ship (read by kdpipe.data.readers)."""
