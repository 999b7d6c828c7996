"""Hugging Face model directories: config.json (config), safetensors shards (safetensors), the loader (loader)."""
