"""Tabular regression from CSV files, with normalisation statistics kept in the run folder (see README.md)."""
