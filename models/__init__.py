"""Standalone reimplementations of the editors' networks; module trees mirror the official checkpoints.

``models`` imports nothing else from this project.
"""
