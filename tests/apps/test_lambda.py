"""Serverless: ``fmi invoke``, the Lambda example and what docs/deploy-lambda.md tells.

``fmi invoke`` runs through the command's entry point (each invocation is a
process of its own); the tests read the JSON line it prints per invocation.
The example invoker for real AWS Lambda runs against a recording stand-in of
boto3's Lambda client (no AWS here), and the events it sends are then run
through the example's handler with each config of the guide.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from fmi_async.channels.dynamodb import TABLE_SCHEMA, TTL_ATTRIBUTE
from fmi_async.config import Config
from fmi_async.errors import ConfigError
from fmi_async.tools.cli import main
from fmi_async.tools.invoke_events import EVENT_KEYS, event_config, job_events
from fmi_async.tools.invoke_runtime import LambdaContext, run_invocation
from tests.helpers import REPO

EXAMPLE = REPO / "examples" / "lambda"
HANDLER = EXAMPLE / "handler.py"
DOC = REPO / "docs" / "deploy-lambda.md"


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


example = load(HANDLER, "lambda_handler_example")
invoker = load(EXAMPLE / "invoke.py", "lambda_invoke_example")


def fmi_invoke(
    capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, list[dict[str, Any]], str]:
    """``fmi invoke ARGV`` (the command's entry point, in this process; each invocation is
    a process of its own): exit status, the JSON records in peer order, all output."""
    code = main(["invoke", "--init-timeout", "60", *argv])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return code, records, out + err


def expected(seed: int, rows: int, peers: int) -> tuple[float, float]:
    """Mean and standard deviation of the example's whole data set, computed in one place."""
    data = np.concatenate([example.shard(seed, p, rows) for p in range(peers)])
    return float(data.mean()), float(data.std())


def check_job(
    records: list[dict[str, Any]], seed: int, rows: int, peers: int, channel: str
) -> None:
    assert [r["peer_id"] for r in records] == list(range(peers))
    assert len({r["request_id"] for r in records}) == peers
    mean, std = expected(seed, rows, peers)
    results = [r["result"] for r in records]
    assert all(r["status"] == "succeeded" for r in records), records
    # One allreduce: every peer holds the very same numbers.
    assert len({(r["mean"], r["std"], r["count"]) for r in results}) == 1
    assert results[0]["mean"] == pytest.approx(mean, rel=1e-12)
    assert results[0]["std"] == pytest.approx(std, rel=1e-9)
    assert results[0]["count"] == rows * peers
    assert [r["num_peers"] for r in results] == [peers] * peers
    assert all(set(r["messages_sent"]) == {channel} for r in results), results


# ---------------------------------------------------------------- fmi invoke, end to end


def test_sync_handler_over_tcp_through_simulated_nat(capsys: pytest.CaptureFixture[str]) -> None:
    event = {"rows": 500, "seed": 7, "label": "nat"}
    code, records, output = fmi_invoke(
        capsys, "-n", "4", str(HANDLER), "--event", json.dumps(event)
    )
    assert code == 0, output
    check_job(records, 7, 500, 4, "tcp")
    assert {r["result"]["label"] for r in records} == {"nat"}  # peer 0's bcast
    for record in records:
        assert record["init_ms"] > 0 and record["duration_ms"] > 0
        assert f"[fmi] peer {record['peer_id']} REPORT RequestId: {record['request_id']}" in output
    found = re.search(r"\[fmi\] NAT port-restricted: .*tcp: (\d+) direct, (\d+) relayed", output)
    assert found is not None, output
    assert int(found[1]) > 0 and int(found[2]) == 0  # the pairs that met punched through


def test_async_handler_over_redis(
    tmp_path: Path, redis_server: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    host, port = redis_server
    config = tmp_path / "redis.json"
    config.write_text(
        json.dumps(
            {
                "backends": {
                    "Redis": {"enabled": True, "host": host, "port": port},
                    "TCP": {"enabled": False},
                },
            }
        )
    )
    argv = ["-n", "4", str(HANDLER), "--handler", "handler.async_handler", "--nat", "none"]
    event = {"rows": 300, "seed": 11}
    code, records, output = fmi_invoke(
        capsys, *argv, "--config", str(config), "--event", json.dumps(event)
    )
    assert code == 0, output
    check_job(records, 11, 300, 4, "redis")


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X")


def test_time_limit_and_a_failing_invocations_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = tmp_path / "limits.py"
    handler.write_text(
        f"""
import os, subprocess, sys, time

def handler(event, context):
    print("remaining", context.get_remaining_time_in_millis(), context.memory_limit_in_mb)
    if event["peer_id"] == 1:
        raise ValueError("peer 1 refuses")
    child = subprocess.Popen(["sleep", "300"])
    with open({str(tmp_path)!r} + "/pids", "w") as out:
        out.write(f"{{os.getpid()}} {{child.pid}}")
    time.sleep(300)
"""
    )
    started = time.monotonic()
    code, records, output = fmi_invoke(
        capsys, "-n", "2", str(handler), "--timeout", "1.5", "--memory", "256", "--nat", "none"
    )
    assert time.monotonic() - started < 60
    assert code == 1, output
    timed_out, failed = records
    assert timed_out["status"] == "timed out"
    assert timed_out["error"]["errorType"] == "Sandbox.Timedout"
    assert timed_out["error"]["errorMessage"].endswith("Task timed out after 1.50 seconds")
    assert "[fmi] peer 0 timed out" in output
    # Killed at the limit, with what it started.
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    # A handler that raises: Lambda's error payload, and the error in the function's log.
    assert failed["status"] == "failed"
    error = failed["error"]
    assert (error["errorType"], error["errorMessage"]) == ("ValueError", "peer 1 refuses")
    assert error["requestId"] == failed["request_id"]
    assert "limits.py" in error["stackTrace"][-1] and "raise ValueError" in error["stackTrace"][-1]
    assert "[peer 1] [ERROR] ValueError: peer 1 refuses" in output
    assert "[fmi] peer 1 failed: peer 1 refuses" in output
    remaining, memory = re.search(r"\[peer 1\] remaining (\d+) (\d+)", output).groups()  # type: ignore[union-attr]
    assert 0 < int(remaining) <= 1500 and memory == "256"


@pytest.mark.slow  # 3-4 s, beyond this file's share of the default run
def test_interrupting_fmi_invoke_stops_every_invocation(tmp_path: Path) -> None:
    handler = tmp_path / "sleepy.py"
    handler.write_text(
        f"""
import os, subprocess, time

def handler(event, context):
    child = subprocess.Popen(["sleep", "300"])
    with open({str(tmp_path)!r} + f"/pids-{{event['peer_id']}}", "w") as out:
        out.write(f"{{os.getpid()}} {{child.pid}}")
    time.sleep(300)
"""
    )
    argv = ["invoke", "-n", "2", str(handler), "--nat", "none", "--init-timeout", "60"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmi_async", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    files = [tmp_path / f"pids-{peer}" for peer in range(2)]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in files) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p) for f in files for p in f.read_text().split()]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted; every invocation was stopped" in err
    assert not any(alive(p) for p in pids)


def test_the_communicators_deadline_comes_before_the_functions_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A peer that never joins: the others' communicators give up before Lambda's limit,
    so each reports why (CommTimeout naming the missing peer) instead of "Task timed out"."""
    handler = tmp_path / "absent.py"
    handler.write_text(
        f"""
import sys
sys.path.insert(0, {str(EXAMPLE)!r})
import handler as example

def handler(event, context):
    if event["peer_id"] == 1:
        return "absent"
    return example.handler(event, context)
"""
    )
    code, records, output = fmi_invoke(
        capsys, "-n", "2", str(handler), "--timeout", "2.5", "--nat", "none"
    )
    assert code == 1, output
    waited, absent = records
    assert absent["status"] == "succeeded" and absent["result"] == "absent"
    assert waited["status"] == "failed", waited
    assert waited["error"]["errorType"] == "CommTimeout"
    assert "peers [1]" in waited["error"]["errorMessage"]
    assert waited["duration_ms"] < 2500


def test_bad_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [  # refused before any process starts
        (["-n", "2", str(tmp_path / "nope.py")], "not found"),
        (["-n", "0", str(HANDLER)], "-n must be at least 1"),
        (["-n", "2", str(HANDLER), "--event", "[1]"], "must be a JSON object"),
        (["-n", "2", str(HANDLER), "--event", '{"peer_id": 3}'], "may not set peer_id"),
        (["-n", "2", str(HANDLER), "--timeout", "0"], "--timeout must be a positive"),
    ]:
        code, records, output = fmi_invoke(capsys, *argv)
        assert code == 2 and records == [] and message in output, (argv, output)


def run_runtime(tmp_path: Path, handler: str, event: Any = None) -> list[dict[str, Any]]:
    """One invocation through the runtime's own function, in this process."""
    out = io.StringIO()
    request = {
        "request_id": "req-1",
        "task_root": str(tmp_path),
        "handler": handler,
        "event": event or {},
        "timeout": 5,
        "memory": 512,
        "function_name": "fn",
    }
    status = run_invocation(request, out)
    reports = [json.loads(line) for line in out.getvalue().splitlines()]
    assert status == (0 if "result" in reports[-1] else 1)
    return reports


def test_the_runtime_reports_as_lambda_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "rt_broken.py").write_text("import no_such_module_here\n")
    (tmp_path / "rt_plain.py").write_text(
        "import asyncio\n"
        "def handler(event, context):\n"
        "    left = context.get_remaining_time_in_millis()\n"
        "    return {'left': left, 'mb': context.memory_limit_in_mb}\n"
        "async def later(event, context):\n"
        "    await asyncio.sleep(0)\n"
        "    return event['x'] * 2\n"
        "def unsendable(event, context):\n"
        "    return object()\n"
        "def large(event, context):\n"
        "    return 'x' * (6 * 1024 * 1024)\n"
    )
    try:
        (error,) = run_runtime(tmp_path, "rt_broken.handler")
        assert error["error"]["errorType"] == "Runtime.ImportModuleError"
        assert error["error"]["errorMessage"] == (
            "Unable to import module 'rt_broken': No module named 'no_such_module_here'"
        )
        (error,) = run_runtime(tmp_path, "rt_plain.nothing")
        assert error["error"]["errorType"] == "Runtime.HandlerNotFound"
        assert error["error"]["errorMessage"] == "Handler 'nothing' missing on module 'rt_plain'"
        ready, done = run_runtime(tmp_path, "rt_plain.handler")
        assert ready["ready"] > 0 and 4000 < done["result"]["left"] <= 5000
        assert done["result"]["mb"] == "512"  # a string, as Lambda's Python runtime has it
        assert run_runtime(tmp_path, "rt_plain.later", {"x": 21})[1]["result"] == 42
        _, failed = run_runtime(tmp_path, "rt_plain.unsendable")
        assert failed["error"]["errorType"] == "Runtime.MarshalError"
        _, failed = run_runtime(tmp_path, "rt_plain.large")
        assert failed["error"]["errorType"] == "Function.ResponseSizeTooLarge"
    finally:
        for name in ("rt_broken", "rt_plain", "no_such_module_here"):
            sys.modules.pop(name, None)


# ---------------------------------------------------------------- events and the real invoker


def test_job_events() -> None:
    config = {"backends": {"TCP": {"host": "10.0.0.5", "port": 10000}}}
    events = job_events({"rows": 5}, 3, "JOB", "r1", config)
    assert events == [
        {
            "rows": 5,
            "peer_id": i,
            "num_peers": 3,
            "comm_name": "JOB",
            "run_id": "r1",
            "config": config,
        }
        for i in range(3)
    ]
    events[0]["config"]["backends"]["TCP"]["port"] = 1
    assert events[1]["config"]["backends"]["TCP"]["port"] == 10000  # a copy each
    for key in EVENT_KEYS:
        with pytest.raises(ConfigError, match=f"may not set {key}"):
            job_events({key: 1}, 2, "JOB", "r1", {})
    with pytest.raises(ConfigError, match=r"security\.secret"):
        job_events({}, 2, "JOB", "r1", {"security": {"secret": "s"}})
    with pytest.raises(ConfigError, match="at least 1"):
        job_events({}, 0, "JOB", "r1", {})
    assert event_config({"security": {"secret": "s"}, "timeout": 5}) == {"timeout": 5}
    assert event_config({"security": {"secret": "s", "handshake_timeout": 2}}) == {
        "security": {"handshake_timeout": 2}
    }


class RecordingLambda:
    """Stands in for ``boto3.client("lambda")``: records each invoke, answers as Lambda does."""

    def __init__(self, status: int = 202) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = status

    def invoke(self, **request: Any) -> dict[str, Any]:
        self.calls.append(request)
        return {"StatusCode": self.status, "Payload": b""}


def context(seconds: float) -> LambdaContext:
    deadline = time.time_ns() // 1_000_000 + int(seconds * 1000)
    return LambdaContext("fmi-job", "1024", f"req-{time.monotonic_ns()}", deadline)


def test_the_real_invoker_refuses_a_job_lambda_did_not_accept() -> None:
    refused = RecordingLambda(status=500)
    with pytest.raises(RuntimeError, match="did not accept"):
        invoker.invoke_job(refused, "fmi-job", 2, {}, {})
    assert len(refused.calls) == 2


# ---------------------------------------------------------------- what docs/deploy-lambda.md tells


def doc_json_blocks() -> list[dict[str, Any]]:
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)]


def doc_configs() -> dict[str, dict[str, Any]]:
    """The doc's configs, by the backend each enables."""
    configs = [b for b in doc_json_blocks() if "backends" in b]
    return {next(iter(c["backends"])): c for c in configs}


def test_the_docs_configs_load() -> None:
    configs = doc_configs()
    assert set(configs) == {"TCP", "Redis", "S3", "DynamoDB"}
    for name, config in configs.items():
        loaded = Config.from_dict(config, origin=f"deploy-lambda.md {name}")
        assert loaded.timeout == 60


# Every S3 and DynamoDB client call of the channels and the job lease, and the IAM
# action it needs; SETUP calls run only with create_bucket/create_table or fmi clean.
IAM_ACTIONS = {
    "head_bucket": "s3:ListBucket",
    "put_object": "s3:PutObject",
    "create_multipart_upload": "s3:PutObject",
    "upload_part": "s3:PutObject",
    "complete_multipart_upload": "s3:PutObject",
    "abort_multipart_upload": "s3:AbortMultipartUpload",
    "head_object": "s3:GetObject",
    "get_object": "s3:GetObject",
    "delete_objects": "s3:DeleteObject",
    "delete_object": "s3:DeleteObject",
    "get_bucket_lifecycle_configuration": "s3:GetLifecycleConfiguration",
    "create_bucket": "s3:CreateBucket",
    "put_bucket_lifecycle_configuration": "s3:PutLifecycleConfiguration",
    "list_objects_v2": "s3:ListBucket",
    "list_multipart_uploads": "s3:ListBucketMultipartUploads",
    "describe_table": "dynamodb:DescribeTable",
    "describe_time_to_live": "dynamodb:DescribeTimeToLive",
    "get_item": "dynamodb:GetItem",
    "put_item": "dynamodb:PutItem",
    "delete_item": "dynamodb:DeleteItem",
    "batch_get_item": "dynamodb:BatchGetItem",
    "batch_write_item": "dynamodb:BatchWriteItem",
    "query": "dynamodb:Query",
    "create_table": "dynamodb:CreateTable",
    "update_time_to_live": "dynamodb:UpdateTimeToLive",
    "scan": "dynamodb:Scan",
}
SETUP = {
    "create_bucket",
    "put_bucket_lifecycle_configuration",
    "list_objects_v2",
    "list_multipart_uploads",
    "create_table",
    "update_time_to_live",
    "scan",
}
NOT_AWS = {"get", "set", "register_script", "aclose", "meta"}  # the Redis lease store's client
AWS_SOURCES = ["channels/s3.py", "channels/s3_bucket.py", "channels/dynamodb.py", "jobs/stores.py"]


def test_the_docs_iam_policy_covers_every_call_the_channels_make() -> None:
    calls: set[str] = set()
    for source in AWS_SOURCES:
        text = (REPO / "fmi_async" / source).read_text()
        calls |= set(re.findall(r"\b(?:self\._client|client)\.([a-z_0-9]+)\b", text)) - NOT_AWS
    unknown = calls - set(IAM_ACTIONS)
    assert not unknown, f"map these client calls to IAM actions (and the doc's policy): {unknown}"
    runtime, setup = (b for b in doc_json_blocks() if b.get("Version") == "2012-10-17")

    def actions(policy: dict[str, Any]) -> set[str]:
        return {a for s in policy["Statement"] for a in s["Action"] if s["Effect"] == "Allow"}

    needed = {IAM_ACTIONS[c] for c in calls - SETUP}
    assert needed == actions(runtime)  # all that the functions need, and nothing more
    assert {IAM_ACTIONS[c] for c in calls & SETUP} <= actions(setup)
    text = DOC.read_text()
    for key in TABLE_SCHEMA["KeySchema"]:
        assert f"AttributeName={key['AttributeName']},KeyType={key['KeyType']}" in text
    for attr in TABLE_SCHEMA["AttributeDefinitions"]:
        assert (
            f"AttributeName={attr['AttributeName']},AttributeType={attr['AttributeType']}" in text
        )
    assert f"AttributeName={TTL_ATTRIBUTE}" in text


@pytest.fixture
def rendezvous_vm(tmp_path: Path) -> Any:
    """``fmi rendezvous --secret-file`` as section 4 starts it (on loopback, any port)."""
    secret = tmp_path / "secret"
    secret.write_text("a secret of this test only\n")
    argv = ["rendezvous", "--host", "127.0.0.1", "--port", "0", "--secret-file", str(secret)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmi_async", *argv], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "rendezvous server listening on HOST:PORT ..."
        found = re.search(r"listening on ([\d.]+):(\d+)", line)
        assert found is not None, line
        yield found[1], int(found[2]), "a secret of this test only"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize(
    "backend",
    # S3 and DynamoDB through the moto server take seconds each: --slow runs them.
    [
        "TCP",
        "Redis",
        pytest.param("S3", marks=pytest.mark.slow),
        pytest.param("DynamoDB", marks=pytest.mark.slow),
    ],
)
async def test_the_docs_configs_run_the_example(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each config of sections 4 and 5, pointed at this test's servers, runs the handler
    with the events the real invoker sends (to a recording stand-in of boto3's client)."""
    config = doc_configs()[backend]
    options = config["backends"][backend]
    if backend == "TCP":
        host, port, secret = request.getfixturevalue("rendezvous_vm")
        options.update(host=host, port=port)
        monkeypatch.setenv("FMI_SECRET", secret)
    elif backend == "Redis":
        host, port = request.getfixturevalue("redis_server")
        options["url"] = f"redis://{host}:{port}"
    else:
        served: Config = request.getfixturevalue(f"{backend.lower()}_config")
        ours = served.to_dict()["backends"]
        (mine,) = ours.values()
        for key in ("endpoint_url", "bucket_name", "table_name", "create_bucket", "create_table"):
            if key in mine:
                options[key] = mine[key]
        options.update({k: v for k, v in mine.items() if k.startswith("backoff")})
    client = RecordingLambda()
    event = {"rows": 50, "seed": 2}
    run_id = invoker.invoke_job(client, "fmi-job", 2, event, config, f"doc-{backend}")
    assert {c["FunctionName"] for c in client.calls} == {"fmi-job"}
    assert {c["InvocationType"] for c in client.calls} == {"Event"}
    events = sorted((json.loads(c["Payload"]) for c in client.calls), key=lambda e: e["peer_id"])
    assert events == job_events(event, 2, f"doc-{backend}", run_id, config)
    # What the two functions do with these events (in one loop here).
    results = await asyncio.gather(*(example.async_handler(e, context(60)) for e in events))
    records = [
        {"peer_id": i, "request_id": str(i), "status": "succeeded", "result": r}
        for i, r in enumerate(results)
    ]
    channel = {"TCP": "tcp", "Redis": "redis", "S3": "s3", "DynamoDB": "dynamodb"}[backend]
    check_job(records, 2, 50, 2, channel)
