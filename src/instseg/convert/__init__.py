"""Checkpoint converters from other toolboxes."""
