"""What users run: the CLI, job entry points and example job specs."""

__all__: list[str] = []
