"""Evaluating what training changed: statistics and reports."""
