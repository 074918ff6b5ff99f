"""Example plugins: ``KDTUNE_PLUGINS=kdtune.examples.plugin`` (see docs/plugins.md)."""
