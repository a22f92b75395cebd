"""Benchmarks. Importing distbelief first gives every benchmark process, baselines
included, the allocator setting the ``distbelief`` commands run with."""

import distbelief  # noqa: F401  (sets THP_MEM_ALLOC_ENABLE before torch is imported)
