"""Generated gRPC stubs for ps.v1 (`make proto`); import as `from common.pb import parameter_server_pb2 as pb`."""
