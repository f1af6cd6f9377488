"""Unit tests of the pure modules: no server, no network."""
