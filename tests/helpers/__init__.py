"""Helpers shared by the tests: rows and configs, renders, environments, clusters, asserts."""
