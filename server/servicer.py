"""The gRPC servicer: a thin adapter from the `ParameterServer` service's methods to the run's service, and its
registration with the hand-framed tensor (de)serializers of `ormo_ps.common.wire` on Train (one copy of the tensor
per direction instead of three or four)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from ormo_ps.common.pb import parameter_server_pb2 as pb
from ormo_ps.common.pb import parameter_server_pb2_grpc as pb_grpc
from ormo_ps.common.wire import Received, parse_worker_message, serialize_message
from ormo_ps.server.front import ShardLost
from ormo_ps.server.service import ParameterServerService, Traffic

SERVICE_NAME = "ps.v1.ParameterServer"


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """ps.v1.ParameterServer over one run's service."""

    def __init__(self, service: ParameterServerService) -> None:
        self.service = service

    async def Train(self, request_iterator: AsyncIterator[Received], context: grpc.aio.ServicerContext) -> None:
        await self.service.train(request_iterator, context)

    async def GetParameters(self, request: pb.GetParametersRequest, context: grpc.aio.ServicerContext) -> pb.Parameters:
        try:
            return await self.service.parameters(request)
        except ShardLost as e:  # (a sharded server that lost a shard has no parameters to give)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.Status:
        return self.service.status()


def _received(parse: Callable[[bytes], Any], traffic: Traffic) -> Callable[[bytes], Any]:
    def deserialize(buf: bytes) -> Any:
        traffic.received_bytes += len(buf)
        return parse(buf)

    return deserialize


def _sent(serialize: Callable[[Any], bytes], traffic: Traffic) -> Callable[[Any], bytes]:
    def serialized(message: Any) -> bytes:
        data = serialize(message)
        traffic.sent_bytes += len(data)
        return data

    return serialized


def add_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """Register `servicer` (a run's service, wrapped here, or any object with the service's three methods, such
    as the benchmark's echo) on `server`. A run's service has its messages' bytes counted (`Traffic`): one
    addition per message, in the (de)serializer gRPC calls anyway."""
    traffic = None
    if isinstance(servicer, ParameterServerService):
        traffic = servicer.traffic
        servicer = ParameterServerServicer(servicer)

    def counted(parse: Callable[[bytes], Any], serialize: Callable[[Any], bytes]) -> dict[str, Any]:
        if traffic is None:
            return dict(request_deserializer=parse, response_serializer=serialize)
        return dict(request_deserializer=_received(parse, traffic), response_serializer=_sent(serialize, traffic))

    handlers = {
        "Train": grpc.stream_stream_rpc_method_handler(
            servicer.Train, **counted(parse_worker_message, serialize_message)),
        "GetParameters": grpc.unary_unary_rpc_method_handler(
            servicer.GetParameters, **counted(pb.GetParametersRequest.FromString, pb.Parameters.SerializeToString)),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetStatus, **counted(pb.GetStatusRequest.FromString, pb.Status.SerializeToString)),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
