"""Tests that build their own network namespaces (root only; each test removes what it made)."""
