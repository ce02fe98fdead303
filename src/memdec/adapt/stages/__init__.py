"""The stages of ``memdec adapt``, one module per group, each stage one function of an ``AdaptRun``
that asks its ``StageBook`` whether it is cached and records its work: ``train`` (the datastore and
the train stages), ``baselines``, ``eval``, ``router``, ``tasks``, ``samples``."""
