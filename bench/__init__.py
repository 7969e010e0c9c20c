"""Side-by-side benchmarks: shardwise vs `transformers.pipeline` vs a naive Ray Data job vs a model-only loop.

    python -m bench.text_classification [--rows N] [--batch-size B] [--repeats R] [--model-size base]

Each benchmark prints a table and writes JSON to `bench/results/` (ignored by git). The four side-by-side
benchmarks (text_classification, image_classification, asr, generation) run through `bench.harness`;
`bench.gpu` (`make bench-gpu`) runs them at base size on CUDA against the anchors of ../shared/GPU.md.
"""

__all__: list[str] = []
