"""Runs as a whole: the run list of a comparison and its queue (``plan``), where finished runs live and how
they are read (``sources``: DVC experiments, ``scripts/run_methods.py`` folders), and collecting them into
records tied to their own results (``collect``). Orchestration, not reporting: the tables, pairs, plots and
findings of those runs are :mod:`layerfold.report`'s. The command is ``scripts/runs.py``."""
