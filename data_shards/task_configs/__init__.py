"""Shipped clinical task definitions (YAML)."""
