"""imgserve: serve image classifiers published by `train` into a TensorFlow-Serving style model store."""

__version__ = "0.1.0"
