"""What is kept of trained models: MLflow tracking, the registry and its lock."""
