"""A Milvus server that froze: it completes the connection (gRPC's handshake and Milvus's ``Connect``, as
a server does before it hangs), then never answers a call. Run as ``python frozen_milvus.py``: it prints
its port (on 127.0.0.1) and serves until killed."""
import threading
from concurrent import futures

import grpc
from pymilvus.grpc_gen import common_pb2, milvus_pb2

CONNECT = '/milvus.proto.milvus.MilvusService/Connect'


class Frozen(grpc.GenericRpcHandler):
    def __init__(self):
        self.never = threading.Event()

    def service(self, details):
        if details.method == CONNECT:
            answer = milvus_pb2.ConnectResponse(status=common_pb2.Status(), identifier=1)
            return grpc.unary_unary_rpc_method_handler(lambda request, context: answer.SerializeToString())
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self.never.wait() or b'')


if __name__ == '__main__':
    server = grpc.server(futures.ThreadPoolExecutor(64), handlers=[Frozen()])
    port = server.add_insecure_port('127.0.0.1:0')
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
