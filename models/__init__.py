"""Offline model recipes (the tiny demo chat model) and the registry of recommended small models."""
