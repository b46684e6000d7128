"""SMIG's evaluation: each benchmark of ``smig bench NAME`` measured against its goal and a baseline from the same run.

One module per benchmark, each with a ``run(quick, progress)`` that returns the figures as plain
JSON-ready data (:mod:`smig.bench.stats` holds what they share). The CLI prints them; the suite
(:mod:`smig.bench.suite`) writes them into ``docs/BENCHMARKS.md`` and ``bench/results/``.
"""
