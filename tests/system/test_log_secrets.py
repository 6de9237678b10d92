"""No secret reaches a log: the demo runs with known credentials and every process's log is searched.

The merchants' secretKey and RSA private key, the master key, the intake token and the
gateway's bearer tokens must appear nowhere, even with REFUNDS_LOG_BODIES=1 (gateway bodies
logged), LOG_LEVEL=DEBUG and gateway faults on. Also: the redaction itself, and that the
services log one JSON object per line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import subprocess
import sys

import pytest

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from refunds import logs
from refunds.vault import generate_master_key
from tests.helpers import ROOT

SENSITIVE_VALUE = re.compile(
    r'\\?"(hashString|accessKey|signature|secretKey|secret_key|privateKey|private_key|token|Authorization|'
    r'PE-Signature)\\?"\s*:\s*\\?"(?!\[REDACTED\])[^"\\]+')
BEARER = re.compile(r"(?i)bearer\s+(?!\[REDACTED\])[A-Za-z0-9._~+/=-]{8,}")
INTAKE_TOKEN = re.compile(r"rfd_(?!\[REDACTED\])[A-Za-z0-9_-]{8,}")
# the only lines that are not JSON: a service's "listening on" line (stdout) and dramatiq's own parent/fork lines
NOT_JSON_ALLOWED = re.compile(r"^(\w[\w-]* listening on http://\S+|\[[^\]]+\] \[PID \d+\] \[\w+\] \[dramatiq\.(MainProcess|ForkProcess\(\d+\))\] .*)$")

# a fake, truncated key marker (spelled apart so no key-shaped literal sits in the repository)
PEM_BEGIN = "-----" + "BEGIN"


def test_redact_removes_credentials_by_field_name_at_any_depth():
    body = {
        "accessKey": "AKDEMO0001", "idService": 1001, "dateRequest": "2024-01-01T10:00:00-05:00",
        "hashString": "ab" * 32,
        "data": {"token": "tok-123", "tokenExpires": "2024-01-01T12:00:00-05:00"},
        "refunds": [{"externalRef": "r-1", "signature": "c2lnbmF0dXJl", "refundAmount": 10.5}],
        "headers": {"Authorization": "Bearer abc.def.ghi", "PE-Signature": "00ff", "Content-Type": "application/json"},
        "secret_key": "s3cr3t", "private_key_pem": PEM_BEGIN + " PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
    }
    safe = logs.redact(body)
    text = json.dumps(safe)
    for leaked in ("AKDEMO0001", "ab" * 32, "tok-123", "c2lnbmF0dXJl", "abc.def.ghi", "00ff", "s3cr3t", "MIIE"):
        assert leaked not in text
    assert safe["idService"] == 1001 and safe["data"]["tokenExpires"] == "2024-01-01T12:00:00-05:00"
    assert safe["refunds"][0]["externalRef"] == "r-1" and safe["refunds"][0]["refundAmount"] == 10.5
    assert body["accessKey"] == "AKDEMO0001"  # a copy: the request itself is untouched
    assert json.loads(json.dumps(logs.redact(json.dumps(body).encode())))["hashString"] == logs.REDACTED


def test_free_text_is_scrubbed_of_tokens_and_private_keys():
    text = ("call with Authorization: Bearer eyJhbGciOi.payload.sig and token rfd_AbCdEf0123456789xyz; key " +
            PEM_BEGIN + " RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY----- done")
    scrubbed = logs.scrub(text)
    for leaked in ("eyJhbGciOi", "rfd_AbCdEf0123456789xyz", "MIIEpAIBAAKCAQEA"):
        assert leaked not in scrubbed
    assert scrubbed.endswith(" done")


def test_json_lines_carry_context_and_cause_and_no_secrets():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("refunds.test.json")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        with logs.context(refund_id="5f0c", merchant="seller-1"):
            log.info("sent with Bearer abcdefghijkl", extra={"external_ref": "r-9", "token": "rfd_secret12345"})
        try:
            raise TimeoutError("gateway did not answer")
        except TimeoutError:
            log.warning("retrying", exc_info=True, extra={"refund_id": "5f0c"})
        os.environ["REFUNDS_LOG_BODIES"] = "1"
        logs.log_exchange(log, "POST", "/v1/authorizations", {"accessKey": "AK1", "hashString": "ff" * 32},
                          201, {"data": {"token": "gw-token-1"}}, headers={"Authorization": "Bearer gw-token-0"})
        os.environ.pop("REFUNDS_LOG_BODIES")
        logs.log_exchange(log, "POST", "/v1/refunds", {"signature": "x"}, 200, {})  # switch off: nothing
    finally:
        os.environ.pop("REFUNDS_LOG_BODIES", None)
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    first, second, exchange = lines
    assert (first["refund_id"], first["merchant"], first["external_ref"]) == ("5f0c", "seller-1", "r-9")
    assert first["level"] == "info" and first["logger"] == "refunds.test.json" and first["ts"].endswith("+00:00")
    assert first["token"] == logs.REDACTED and "abcdefghijkl" not in first["msg"]
    assert second["cause"] == "TimeoutError: gateway did not answer" and "merchant" not in second
    assert exchange["event"] == "gateway_exchange" and exchange["status"] == 201
    assert exchange["request_body"] == {"accessKey": logs.REDACTED, "hashString": logs.REDACTED}
    assert exchange["response_body"] == {"data": {"token": logs.REDACTED}}
    assert "gw-token" not in stream.getvalue() and "AK1" not in stream.getvalue()


@pytest.mark.slow
def test_no_secret_in_any_log_of_a_demo_run(db, database_url, redis_url, tmp_path):
    secret_key = "sk-test-" + secrets.token_urlsafe(24)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    key_file = tmp_path / "merchant.pem"
    key_file.write_bytes(private_pem)
    master_key = generate_master_key()
    log_dir = tmp_path / "logs"
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "REFUNDS_MASTER_KEY": master_key,
           "REFUNDS_DEMO_SECRET_KEY": secret_key, "REFUNDS_DEMO_PRIVATE_KEY_FILE": str(key_file),
           "REFUNDS_DEMO_LOG_DIR": str(log_dir), "REFUNDS_LOG_BODIES": "1", "LOG_LEVEL": "DEBUG"}
    run = subprocess.run([sys.executable, "-m", "refundctl", "demo", "--refunds", "40", "--merchants", "2", "--chaos"],
                         env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    logs_by_name = {path.name: path.read_text(errors="replace") for path in sorted(log_dir.glob("*.log"))}
    assert set(logs_by_name) >= {"intake.log", "receiver.log", "worker.log", "scheduler.log", "sandbox.log"}
    logs_by_name["demo stdout+stderr"] = run.stdout + run.stderr
    key_lines = [line for line in private_pem.decode().splitlines() if line and not line.startswith("-----")]
    master_body = master_key.rstrip("=")
    for name, text in logs_by_name.items():
        assert secret_key not in text, f"{name}: the merchant's secretKey"
        assert master_body not in text, f"{name}: the master key"
        for line in key_lines:
            assert line not in text, f"{name}: a line of the merchant's private key"
        for pattern in (BEARER, INTAKE_TOKEN, SENSITIVE_VALUE):
            found = pattern.search(text)
            assert found is None, f"{name}: {text[max(0, found.start() - 200):found.end() + 50]}"

    # every process logs one JSON object per line
    for name, text in logs_by_name.items():
        if name.endswith(".log"):
            json_lines = 0
            for line in text.splitlines():
                if line.startswith("{"):
                    json.loads(line)
                    json_lines += 1
                else:
                    assert NOT_JSON_ALLOWED.match(line), f"{name}: not a JSON line: {line[:300]}"
            assert json_lines, f"{name}: no JSON log line"
    worker_lines = [json.loads(line) for line in logs_by_name["worker.log"].splitlines() if line.startswith("{")]
    assert any(line.get("refund_id") and line.get("merchant") for line in worker_lines)
    # the workers log the gateway exchanges (REFUNDS_LOG_BODIES=1): the bodies were there, and redacted
    exchanges = [line for line in worker_lines if line.get("event") == "gateway_exchange"]
    assert exchanges and any(logs.REDACTED in json.dumps(line) for line in exchanges)
