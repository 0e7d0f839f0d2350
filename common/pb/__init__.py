"""Generated gRPC stubs for ps.v1 (`make proto`); import as `from ormo_ps.common.pb import parameter_server_pb2 as pb`."""
