"""kiln-infer: the gRPC inference server and its engine."""
