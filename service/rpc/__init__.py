"""gRPC beside HTTP, in the same process and through the same pipeline: Triton's / KServe v2's
`inference.GRPCInferenceService`, TF Serving's `PredictionService` and `ModelService`, and
`grpc.health.v1.Health`, on IMGSERVE_GRPC_PORT (service/rpc/server.py)."""
