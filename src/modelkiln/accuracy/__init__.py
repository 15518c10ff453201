"""Accuracy: comparing models and scoring them on their task."""
