#!/usr/bin/env python3
"""A real Python gRPC client (grpcio) against a running chipgate cluster.

Generates stubs from proto/ with grpc_tools at run time, then checks what a Python service or
operator script relies on: health (grpc_health), reflection (grpc_reflection), a JSON-free typed call
path through licensing, inventory and orders, and the rich error details (google.rpc.Status in the
`grpc-status-details-bin` trailer) on a bad request. Exits non-zero with a message on any failure.

Usage: client_check.py --licensing HOST:PORT --inventory HOST:PORT --orders HOST:PORT
"""

import argparse
import importlib
import os
import sys
import tempfile
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def generate():
    out = tempfile.mkdtemp(prefix="chipgate-py-")
    proto_dir = os.path.join(ROOT, "proto")
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    files = [
        "chipgate/licensing/v1/licensing.proto",
        "chipgate/inventory/v1/inventory.proto",
        "chipgate/orders/v1/orders.proto",
    ]
    args = ["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        fail("grpc_tools.protoc could not compile proto/")
    sys.path.insert(0, out)
    return {
        name: (importlib.import_module(f"chipgate.{name}.v1.{name}_pb2"), importlib.import_module(f"chipgate.{name}.v1.{name}_pb2_grpc"))
        for name in ("licensing", "inventory", "orders")
    }


def rid():
    return f"py-{uuid.uuid4().hex[:12]}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--licensing", required=True)
    p.add_argument("--inventory", required=True)
    p.add_argument("--orders", required=True)
    p.add_argument("--token-dir", required=True, help="files <role>.jwt and buyer-<id>.jwt, as `chipgate dev` writes them")
    a = p.parse_args()

    def auth(party):
        with open(os.path.join(a.token_dir, f"{party}.jwt")) as f:
            return (("authorization", "Bearer " + f.read().strip()),)

    mods = generate()
    lic_pb, lic_grpc = mods["licensing"]
    inv_pb, inv_grpc = mods["inventory"]
    ord_pb, ord_grpc = mods["orders"]

    channels = {k: grpc.insecure_channel(v) for k, v in (("licensing", a.licensing), ("inventory", a.inventory), ("orders", a.orders))}
    for name, ch in channels.items():
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            fail(f"{name} health is {status}")
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = [s.name for r in answers for s in r.list_services_response.service]
        want = f"chipgate.{name if name != 'orders' else 'orders'}.v1."
        if not any(s.startswith(want) for s in services):
            fail(f"{name} reflection lists {services}")

    lic = lic_grpc.LicensingServiceStub(channels["licensing"])
    # Without a token: UNAUTHENTICATED.
    try:
        lic.ListQueue(lic_pb.ListQueueRequest(), timeout=5)
        fail("a call without a token was answered")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            fail(f"a call without a token answered {e.code()}")
    inv = inv_grpc.InventoryServiceStub(channels["inventory"])
    orders = ord_grpc.OrderServiceStub(channels["orders"])
    sku = "H20-96GB"
    lic.GrantExportAuthorization(lic_pb.GrantExportAuthorizationRequest(request_id=rid(), vendor="nvidia", product_sku=sku, destination="CN", reference="py"), timeout=5, metadata=auth("export_authority"))
    app = lic.SubmitApplication(
        lic_pb.SubmitApplicationRequest(request_id=rid(), buyer_id="iflytek", product_sku=sku, quantity=500, end_use="speech models", site="Hefei"), timeout=5, metadata=auth("buyer-iflytek")
    ).application
    wave = lic.CreateWave(lic_pb.CreateWaveRequest(request_id=rid(), display_name="py wave"), timeout=5, metadata=auth("import_authority")).wave
    lic.AddWaveGrant(lic_pb.AddWaveGrantRequest(request_id=rid(), wave_id=wave.wave_id, application_id=app.application_id, granted_units=500), timeout=5, metadata=auth("import_authority"))
    published = lic.PublishWave(lic_pb.PublishWaveRequest(request_id=rid(), wave_id=wave.wave_id), timeout=5, metadata=auth("import_authority"))
    if published.licenses[0].state != lic_pb.LICENSE_STATE_ACTIVE:
        fail(f"licence state {published.licenses[0].state}")
    inv.ReceiveSupply(inv_pb.ReceiveSupplyRequest(request_id=rid(), receipt_id=rid(), product_sku=sku, units=200), timeout=5, metadata=auth("vendor"))
    order = orders.PlaceOrder(ord_pb.PlaceOrderRequest(request_id=rid(), buyer_id="iflytek", product_sku=sku, units=150, justification="ASR"), timeout=10, metadata=auth("buyer-iflytek")).order
    if order.state != ord_pb.ORDER_STATE_RESERVED or order.held_units != 150:
        fail(f"order is {ord_pb.OrderState.Name(order.state)} holding {order.held_units}")

    # A bad request: INVALID_ARGUMENT with google.rpc.BadRequest details in the trailer.
    try:
        orders.PlaceOrder(ord_pb.PlaceOrderRequest(request_id="", buyer_id="iflytek", product_sku=sku, units=0), timeout=5, metadata=auth("buyer-iflytek"))
        fail("a request without request_id and units was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            fail(f"bad request answered {e.code()}")
        details = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin")
        if not details:
            fail("no grpc-status-details-bin trailer")
        # google.rpc.Status{code=1, message=2, details=3 (Any)}; look for the BadRequest type URL.
        if b"type.googleapis.com/google.rpc.BadRequest" not in details or b"request_id" not in details:
            fail(f"details lack the BadRequest field violations: {details!r}")
    print("python client: health, reflection, tokens, licensing → inventory → orders, rich errors: ok")


if __name__ == "__main__":
    main()
