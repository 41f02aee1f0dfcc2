"""A classifier with two inputs, the top and bottom halves of the 8x8 digits (see README.md)."""
