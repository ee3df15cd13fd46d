"""Shared pieces of Kiln: config, model loading, adapter store, Redis schemas, weight sharing."""
