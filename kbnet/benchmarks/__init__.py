"""Benchmark scripts: side-by-side Markdown tables of this project's fast paths against the official ones."""
