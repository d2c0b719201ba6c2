"""Training: the run config (:mod:`~lipnet.training.config`), what it builds (:mod:`~lipnet.training.build`),
the device and DDP processes (:mod:`~lipnet.training.devices`), the one fit loop
(:mod:`~lipnet.training.loop`: ``fit``, ``TrainingDivergedError``), a training run with its end-of-run
certification (:mod:`~lipnet.training.run`: ``train``, ``load_run_model``, ``certify_run``), the run folder
(:mod:`~lipnet.training.runs`), the loss-parameter sweep (:mod:`~lipnet.training.sweep`) and the plots
(:mod:`~lipnet.training.plots`).

Nothing is imported here: the config module imports the loop, and the run imports the config, so each
is imported from its own module.
"""
