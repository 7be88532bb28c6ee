"""The HTTP layer: the ASGI app, its middleware and error handling."""
