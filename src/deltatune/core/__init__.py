"""Machinery shared by every method: finding targets, swapping layers, naming keys, files."""
