"""Tests for deltatune.tinylora (a package so its test_layer.py does not clash with the other methods')."""
