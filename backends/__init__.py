"""Pluggable backends (torch, MLX) implementing the heavy parts against one contract."""
