"""Python's standard gRPC reflection client (grpcio-reflection, which speaks
grpc.reflection.v1alpha) against moemesh's frontend (run by tests/tests/up.rs): it lists the
services, builds GenerateRequest and GenerateResponse from the descriptors the server sends (no
generated code), and calls Generate with them.

argv: HOST:PORT, prompt token ids (comma-separated), max_new_tokens. Prints one JSON line: the
services, the streamed token ids and the finish reason. Raises (exit 1) on any failure.
"""
import json
import sys

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

addr, ids, max_new = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3])
channel = grpc.insecure_channel(addr)
db = ProtoReflectionDescriptorDatabase(channel)
services = sorted(db.get_services())
pool = DescriptorPool(db)
method = pool.FindServiceByName("moemesh.v1.Generation").methods_by_name["Generate"]
request_type = message_factory.GetMessageClass(method.input_type)
response_type = message_factory.GetMessageClass(method.output_type)

request = request_type()
request.tokens.ids.extend(ids)
request.stopping.max_new_tokens = max_new
request.stopping.ignore_eos = True
generate = channel.unary_stream(
    "/moemesh.v1.Generation/Generate",
    request_serializer=request_type.SerializeToString,
    response_deserializer=response_type.FromString,
)
tokens, finish = [], None
for message in generate(request, timeout=120):
    tokens.extend(message.token_ids)
    if message.finish_reason:
        finish = method.output_type.fields_by_name["finish_reason"].enum_type.values_by_number[
            message.finish_reason
        ].name
print(json.dumps({"services": services, "token_ids": tokens, "finish_reason": finish}))
