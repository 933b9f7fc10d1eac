"""The `serve` section of an experiment (its config only: the Serve application is vgmedgen.serve)."""
