"""KServe 0.21 ``ModelServer`` serving one AOTInductor package (run by the KServe venv's python).

The package is loaded with ``torch._inductor.aoti_load_package`` in this
process. KServe binds gRPC to ``[::]`` and REST to ``0.0.0.0`` in code; we bind
both to 127.0.0.1 by patching in this process (site-packages stay untouched).
Everything else is KServe's defaults (4 gRPC threads, latency logging on), as a
user would run it. ``predict`` is ``async`` so no executor hop is added.
"""

from __future__ import annotations

import argparse
import sys


def _bind_localhost() -> None:
    import grpc.aio._server as aio_server
    import uvicorn

    original_add = aio_server.Server.add_insecure_port

    def add_insecure_port(self, address: str) -> int:
        return original_add(self, "127.0.0.1:" + address.rsplit(":", 1)[1])

    aio_server.Server.add_insecure_port = add_insecure_port

    original_config_init = uvicorn.Config.__init__

    def config_init(self, *args, **kwargs):
        kwargs["host"] = "127.0.0.1"
        original_config_init(self, *args, **kwargs)

    uvicorn.Config.__init__ = config_init


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--package", required=True)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    args = ap.parse_args()
    # kserve.model_server parses sys.argv at import; give it nothing of ours.
    sys.argv = sys.argv[:1]

    import torch

    _bind_localhost()
    import kserve
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class AOTIModel(kserve.Model):
        def __init__(self, name: str, package: str):
            super().__init__(name)
            self.package = package
            self.model = None

        def load(self) -> bool:
            self.model = torch._inductor.aoti_load_package(self.package)
            self.ready = True
            return self.ready

        async def predict(
            self, payload: InferRequest, headers=None, response_headers=None
        ) -> InferResponse:
            x = torch.from_numpy(payload.inputs[0].as_numpy())
            with torch.no_grad():
                out = self.model(x)
            out = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
            result = InferOutput(name="output__0", shape=list(out.shape), datatype="FP32")
            result.set_data_from_numpy(out, binary_data=True)
            return InferResponse(
                response_id=payload.id, model_name=self.name, infer_outputs=[result]
            )

    model = AOTIModel(args.model, args.package)
    model.load()
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port).start([model])


if __name__ == "__main__":
    main()
