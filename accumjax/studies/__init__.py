"""The studies behind docs/studies.md, as library code: the experiment modules
(`python -m experiments.NAME`) and the notebooks call these. Each module's docstring says what it
measures; the command, its cost and its result are in the experiment module and benchmarks/."""
