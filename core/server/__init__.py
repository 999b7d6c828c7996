"""The bundled HTTP server: OpenAI and Ollama APIs over one AsyncEngine (needs the `serve` extra)."""
