"""Evaluation: metrics and confusion matrices per (model, train dataset, eval dataset), the
zero-shot mapping of HSEmotion heads to the 3 classes, and the results report beside the
seed's published numbers. Knows nothing of models, training or MLflow: it takes labels and
probabilities and writes plain files that DVC and the report stage read."""
