"""The pipeline as both engines see it: the stage table, the params schema, configuration
overlays, and the one-runner-per-checkout claim."""
