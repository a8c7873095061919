"""Calibration: text data (data.py) and statistics accumulators (stats.py)."""
