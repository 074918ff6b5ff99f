"""Example plugins: ``KDTUNE_PLUGINS=kdtune.examples.plugin`` (see the README, "Writing a
method, a sampler, a model or a dataset")."""
