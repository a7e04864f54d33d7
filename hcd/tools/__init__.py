"""Commands around the pipeline (not stages): ``hcd infer``, ``hcd submit``, ``hcd lr-find``."""
