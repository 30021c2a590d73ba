"""Orchestration: the plan (versions), the artifact store, the stage runner, the Prefect flow and the CLI."""
