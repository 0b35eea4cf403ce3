"""Experiments over several tasks: the task registry and loaders (:mod:`delta_trl.experiment.tasks`)."""
