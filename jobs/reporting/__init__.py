"""Reporting: stats.json, the gallery and contact sheet, progress lines and the summary table."""
