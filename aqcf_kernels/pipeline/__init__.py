"""The reproduction pipeline: config, training, inference, evaluation, explanation (the `train` extra)."""
