"""Model construction and checkpoint reading."""
