"""Side-by-side benchmarks: shardwise vs `transformers.pipeline` vs a naive Ray Data job vs a model-only loop.

    python -m bench.text_classification [--rows N] [--batch-size B] [--repeats R] [--model-size base]

Each benchmark prints a table and writes JSON to `bench/results/` (ignored by git).
"""

__all__: list[str] = []
