"""kiln-train: the daemon that fine-tunes adapters from served samples."""
