"""Benchmarks: each module's ``main()`` prints one JSON line of figures (``python -m tests.bench``)."""
