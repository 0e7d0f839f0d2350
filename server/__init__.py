"""The parameter server: ServerCore, the update rules, the gRPC service."""
