"""The benchmarks (``kbnet-bench``): side-by-side Markdown tables of this project's fast paths against the official
ones."""
