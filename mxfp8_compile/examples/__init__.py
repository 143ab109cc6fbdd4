"""Built-in example models: small, self-contained, CPU-friendly."""
