"""Training: data (corpora, pre-training instances, dynamic masking, task datasets), the loop,
optimizers and checkpoints.

Submodules are imported on use (``bertrt.train.data``, ``bertrt.train.corpus``,
``bertrt.train.tasks``, ...); this package imports nothing eagerly. See ``docs/data.md``.
"""
