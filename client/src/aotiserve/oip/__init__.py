"""Generated code for the Open Inference Protocol (``inference.GRPCInferenceService``).

``inference_pb2`` / ``inference_pb2_grpc`` come from
``proto/aotiserve/oip/inference.proto`` via ``make proto``; never edit them.

Do not import these modules into a process that also imports tritonclient
(or any other copy of the KServe v2 / Triton protos): both register messages
named ``inference.*`` in protobuf's default descriptor pool, and the second
import fails with "duplicate symbol". Use tritonclient as the client; the
aotiserve server itself does not import this package (it loads the same
descriptor into a private pool), and tests/test_oip.py drives a daemon
subprocess and never imports it.
"""
