"""A character-level transformer language model (see README.md)."""
