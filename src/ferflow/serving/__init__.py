"""Using a trained model: predict on photos, export, serving manifests."""
