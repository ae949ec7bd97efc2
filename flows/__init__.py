"""Prefect flows over the adaptflow stages."""
