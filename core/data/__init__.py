"""Preference data: read any common format into one normalized record."""

from core.data.load import LoadReport, load_preferences
from core.data.records import Location, Message, PreferencePair

__all__ = ["LoadReport", "Location", "Message", "PreferencePair", "load_preferences"]
