"""Running models: ONNX Runtime sessions, served models and their registry, scheduling."""
