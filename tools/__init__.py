"""Command-line tools of the repository (benchmarks, dataset writing, exports, a local multi-process launcher).

Each is run as ``python tools/<name>.py`` from the repository root; tests and sibling tools import them as
``tools.<name>``. They are not part of the installed package.
"""
