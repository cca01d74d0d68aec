"""Interop checks of changetoken.v1 from a Python client generated with grpcio-tools.

The server at CHANGETOKEN_ENDPOINT (host:port, plaintext) runs with a short
--propagation-delay, so a submitted change is PENDING for a moment and then INSYNC.
Exits non-zero with a message on the first failed check and prints `interop: ok` when
every check passed. No call waits longer than DEADLINE seconds.
"""

import os
import re
import sys
import tempfile
import threading
import traceback
import uuid
from pathlib import Path

try:
    import grpc
    import grpc_tools
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    from grpc_tools import protoc
except ImportError as missing:
    sys.exit(f"interop: FAIL: {missing}: run with target/tools/venv/bin/python (see scripts/tools)")

DEADLINE = 10.0
SCOPE = "interop/python"
ERROR_DOMAIN = "changetoken"
UUID_V4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


def fail(message):
    print(f"interop: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def generate_stubs(out_dir):
    """Compiles the proto into out_dir and imports the generated modules."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "changetoken/v1/changetoken.proto",
    ]
    if protoc.main(args) != 0:
        fail(f"protoc could not compile {PROTO_ROOT}/changetoken/v1/changetoken.proto")
    sys.path.insert(0, str(out_dir))
    from changetoken.v1 import changetoken_pb2, changetoken_pb2_grpc

    return changetoken_pb2, changetoken_pb2_grpc


def expect_error(what, call, code, reason):
    """Runs call, which must fail with code and an ErrorInfo detail carrying reason."""
    try:
        call()
    except grpc.RpcError as err:
        check(
            err.code() == code,
            f"{what}: expected {code.name}, got {err.code().name}: {err.details()}",
        )
        try:
            status = rpc_status.from_call(err)
        except ValueError as mismatch:
            fail(f"{what}: google.rpc.Status disagrees with the gRPC status: {mismatch}")
        check(status is not None, f"{what}: no google.rpc.Status in grpc-status-details-bin")
        infos = []
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                infos.append(info)
        check(
            len(infos) == 1, f"{what}: expected one google.rpc.ErrorInfo detail, got {len(infos)}"
        )
        check(
            infos[0].reason == reason, f"{what}: expected reason {reason}, got {infos[0].reason!r}"
        )
        check(
            infos[0].domain == ERROR_DOMAIN,
            f"{what}: expected domain {ERROR_DOMAIN!r}, got {infos[0].domain!r}",
        )
    else:
        fail(f"{what}: expected {code.name}, got OK")


class Watcher(threading.Thread):
    """Collects a WatchToken stream; `first` is set once the first message arrived."""

    def __init__(self, stub, request):
        super().__init__(daemon=True)
        self.stub, self.request = stub, request
        self.messages, self.error = [], None
        self.first = threading.Event()

    def run(self):
        try:
            for message in self.stub.WatchToken(self.request, timeout=DEADLINE):
                self.messages.append(message)
                self.first.set()
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.first.set()


def main():
    endpoint = os.environ.get("CHANGETOKEN_ENDPOINT")
    check(endpoint, "CHANGETOKEN_ENDPOINT is not set (expected host:port)")
    with tempfile.TemporaryDirectory(prefix="changetoken-stubs-") as out_dir:
        pb, pb_grpc = generate_stubs(out_dir)
        channel = grpc.insecure_channel(endpoint)
        try:
            grpc.channel_ready_future(channel).result(timeout=DEADLINE)
        except grpc.FutureTimeoutError:
            fail(f"no server reachable at {endpoint} within {DEADLINE:.0f} s")
        run_checks(pb, pb_grpc.ChangeTokenServiceStub(channel))
        channel.close()
    print("interop: ok")


def run_checks(pb, stub):
    Status = pb.ChangeTokenStatus

    def status_of(token):
        reply = stub.GetChangeTokenStatus(
            pb.GetChangeTokenStatusRequest(change_token=token), timeout=DEADLINE
        )
        return Status.Name(reply.change_token_status)

    def token_of(scope):
        reply = stub.GetChangeToken(pb.GetChangeTokenRequest(scope=scope), timeout=DEADLINE)
        return reply.change_token

    # An outstanding token is handed out again until it is used.
    token = token_of(SCOPE)
    check(UUID_V4.fullmatch(token), f"GetChangeToken: {token!r} is not a lowercase UUIDv4")
    again = token_of(SCOPE)
    check(again == token, f"GetChangeToken: second call returned {again!r}, first {token!r}")
    status = status_of(token)
    check(
        status == "CHANGE_TOKEN_STATUS_PROVISIONED",
        f"GetChangeTokenStatus: fresh token is {status}, expected PROVISIONED",
    )

    watcher = Watcher(stub, pb.WatchTokenRequest(change_token=token))
    watcher.start()
    check(watcher.first.wait(DEADLINE), "WatchToken: no first message within the deadline")
    if watcher.error is not None:
        fail(
            f"WatchToken: {watcher.error.code().name} before any message: {watcher.error.details()}"
        )

    submit = pb.SubmitChangeRequest(change_token=token, payload=b"hello", description="from python")
    revision = stub.SubmitChange(submit, timeout=DEADLINE).revision
    check(revision > 0, f"SubmitChange: revision {revision}, expected > 0")
    retried = stub.SubmitChange(submit, timeout=DEADLINE)
    check(
        retried.revision == revision,
        f"SubmitChange retry: revision {retried.revision}, original {revision}",
    )
    check(retried.change_token == token, f"SubmitChange retry: token {retried.change_token!r}")

    # A used token is no longer the scope's outstanding one.
    check(token_of(SCOPE) != token, "GetChangeToken after SubmitChange returned the used token")

    watcher.join(DEADLINE)
    check(not watcher.is_alive(), "WatchToken: stream did not end within the deadline")
    if watcher.error is not None:
        fail(
            f"WatchToken: stream ended with {watcher.error.code().name}: {watcher.error.details()}"
        )
    seen = [(Status.Name(m.change_token_status), m.revision) for m in watcher.messages]
    expected = [
        ("CHANGE_TOKEN_STATUS_PROVISIONED", 0),
        ("CHANGE_TOKEN_STATUS_PENDING", revision),
        ("CHANGE_TOKEN_STATUS_INSYNC", revision),
    ]
    check(seen == expected, f"WatchToken: got (status, revision) {seen}, expected {expected}")
    for m in watcher.messages:
        check(
            m.change_token == token,
            f"WatchToken: message for {m.change_token!r}, watched {token!r}",
        )
        check(
            m.HasField("changed_at"),
            f"WatchToken: {Status.Name(m.change_token_status)} has no changed_at",
        )
    times = [m.changed_at.ToNanoseconds() for m in watcher.messages]
    check(times == sorted(times), f"WatchToken: changed_at goes backwards: {times}")
    status = status_of(token)
    check(
        status == "CHANGE_TOKEN_STATUS_INSYNC",
        f"GetChangeTokenStatus after the INSYNC message: {status}",
    )

    stale = pb.SubmitChangeRequest(change_token=token, payload=b"other", description="from python")
    expect_error(
        "SubmitChange with a used token and another payload",
        lambda: stub.SubmitChange(stale, timeout=DEADLINE),
        grpc.StatusCode.ABORTED,
        "CHANGE_TOKEN_STALE",
    )

    unknown = str(uuid.uuid4())
    expect_error(
        "GetChangeTokenStatus of a never issued token",
        lambda: status_of(unknown),
        grpc.StatusCode.NOT_FOUND,
        "CHANGE_TOKEN_NOT_FOUND",
    )
    expect_error(
        "GetChangeTokenStatus of 'not-a-token'",
        lambda: status_of("not-a-token"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CHANGE_TOKEN",
    )
    expect_error(
        "GetChangeToken with scope 'bad scope!'",
        lambda: token_of("bad scope!"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_SCOPE",
    )
    expect_error(
        "WatchToken of a never issued token",
        lambda: list(stub.WatchToken(pb.WatchTokenRequest(change_token=unknown), timeout=DEADLINE)),
        grpc.StatusCode.NOT_FOUND,
        "CHANGE_TOKEN_NOT_FOUND",
    )


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as err:
        ours = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == __file__]
        fail(f"line {ours[-1].lineno} ({ours[-1].line}): {err.code().name}: {err.details()}")
