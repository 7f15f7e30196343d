"""captioning: CNN-encoder + recurrent-decoder image captioning on Lightning and Hydra."""

__version__ = "0.1.0"
