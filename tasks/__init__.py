"""Thin Prefect tasks around ``adaptflow.stages.*.run``: one task per stage, nothing else."""
