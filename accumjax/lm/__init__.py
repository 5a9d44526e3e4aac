"""A byte-level transformer LM trainer built on the accumulation library (`accumjax`).

`python -m experiments.train` is its command line. Modules: `config` (one nested TrainConfig),
`data` (the embedded default corpus), `model` (flax.nnx transformer), `build` (optimizer,
loss, memory plan), `train` (train_and_evaluate), `resume`, `faults` (fault drills), `logs`.
"""
