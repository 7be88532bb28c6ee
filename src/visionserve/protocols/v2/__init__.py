"""Open Inference Protocol (V2) REST adapter."""
