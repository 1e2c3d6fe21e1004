"""gRPC service layer: thin conversion and error mapping."""
