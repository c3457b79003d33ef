"""Evaluation: metrics and confusion matrices per (model, train dataset, eval dataset), the
zero-shot row of a pretrained head mapped to the 3 classes, the error gallery, and the
results report beside the seed's published numbers. `metrics`, `gallery` and `report` take
labels and probabilities and write plain files; `evaluate` loads a trained run (or a zoo
model) through models.inference and feeds them. Knows nothing of MLflow: tracking logs
what it writes."""
