"""ferflow: facial-expression recognition under face masks, as an MLOps pipeline."""

__version__ = "0.1.0"
