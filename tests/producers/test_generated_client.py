"""Clients generated from the served OpenAPI document work against a live intake: create, replay,
conflict, read, list and errors. Python (openapi-python-client): every answer parsed into its model,
unexpected statuses raised, each model written out again equal to the body. TypeScript under node
(openapi-typescript types, openapi-fetch calls): tsc --strict checks every use against the
document, and each answer has only the fields the document declares."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from producers.http import create_app
from tests.helpers import paid
from tests.producers.test_intake import bearer
from tests.stack import serve

REDIS_DB = 2  # module_redis_url: a Redis database of our own
BIN = Path(sys.executable).parent
PACKAGE = "intake_client"


@pytest_asyncio.fixture
async def intake(db, database_url, module_redis_url):
    runner, url = await serve(create_app(database_url=database_url))
    try:
        yield url
    finally:
        await runner.cleanup()


async def served_document(url: str, folder: Path) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/openapi.json") as response:
        assert response.status == 200
        (folder / "openapi.json").write_text(json.dumps(await response.json()))


async def generated(url: str, folder: Path):
    """The client package generated from the document ``url`` serves, imported."""
    if not (BIN / "openapi-python-client").exists():
        pytest.fail("openapi-python-client is not installed: pip install -e '.[test]'", pytrace=False)
    await served_document(url, folder)
    done = subprocess.run(
        [str(BIN / "openapi-python-client"), "generate", "--path", "openapi.json", "--meta", "none",
         "--output-path", PACKAGE], cwd=folder, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})  # its ruff post-hooks
    assert done.returncode == 0 and "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))


def read_back(answer) -> dict:
    """The parsed answer written out again: equal to the body only when every field was modelled
    (the generated models drop fields the document does not declare) and read as sent."""
    return answer.parsed.to_dict()


@pytest.mark.slow
async def test_a_generated_python_client_reads_every_answer(db, make_merchant, intake, tmp_path):
    pkg = await generated(intake, tmp_path)
    api = importlib.import_module(f"{PACKAGE}.api.refunds")
    models = importlib.import_module(f"{PACKAGE}.models")
    for name in ("create_refund", "get_refund", "list_refunds"):
        importlib.import_module(f"{PACKAGE}.api.refunds.{name}")
    await make_merchant("m1")
    await paid(db)
    token = (await bearer(db))["Authorization"].removeprefix("Bearer ")
    client = pkg.AuthenticatedClient(base_url=intake, token=token, raise_on_unexpected_status=True)

    def request(**changes):
        fields = dict(merchant_id="m1", original_transaction_id="CIP-1", amount="10.00",
                      currency=models.RefundRequestCurrency.PEN, external_ref="R-1", reason="damaged")
        return models.RefundRequest(**{**fields, **changes})

    async with client:
        created = await api.create_refund.asyncio_detailed(client=client, body=request())
        assert created.status_code == 202 and isinstance(created.parsed, models.Accepted)
        refund_id = created.parsed.refund_id

        replay = await api.create_refund.asyncio_detailed(client=client, body=request())
        assert replay.status_code == 200 and replay.parsed == created.parsed
        assert replay.headers["Idempotent-Replayed"] == "true"

        conflict = await api.create_refund.asyncio_detailed(client=client, body=request(amount="20.00"))
        assert conflict.status_code == 409 and isinstance(conflict.parsed, models.Error)
        assert conflict.parsed.error.request_id == conflict.headers["X-Request-Id"]
        assert conflict.parsed.error.code is models.ErrorCode.EXTERNAL_REF_CONFLICT  # an enum, not a string

        read = await api.get_refund.asyncio_detailed(refund_id, client=client)
        assert read.status_code == 200 and isinstance(read.parsed, models.RefundWithEvents)
        assert read.parsed.refund_id == refund_id and read.parsed.events[0].from_state is None

        await api.create_refund.asyncio_detailed(client=client, body=request(external_ref="R-2", amount="1.00"))
        first = await api.list_refunds.asyncio_detailed(client=client, merchant_id="m1", limit=1)
        assert first.status_code == 200 and isinstance(first.parsed, models.RefundList)
        assert [r.external_ref for r in first.parsed.refunds] == ["R-1"] and first.parsed.next_cursor
        rest = await api.list_refunds.asyncio_detailed(client=client, merchant_id="m1", after=first.parsed.next_cursor)
        assert [r.external_ref for r in rest.parsed.refunds] == ["R-2"] and rest.parsed.next_cursor is None
        one = await api.list_refunds.asyncio_detailed(client=client, merchant_id="m1", external_ref="R-2")
        assert isinstance(one.parsed, models.RefundWithEvents) and one.parsed.external_ref == "R-2"

        refused = await api.create_refund.asyncio_detailed(client=client, body=request(external_ref="R-3",
                                                                                       amount="10.001"))
        assert refused.status_code == 422 and refused.parsed.error.field == "amount"
        assert refused.parsed.error.code is models.ErrorCode.INVALID_AMOUNT

        for answer in (created, replay, conflict, read, first, rest, one, refused):
            assert read_back(answer) == json.loads(answer.content)

    anonymous = pkg.Client(base_url=intake, raise_on_unexpected_status=True)
    async with anonymous:
        denied = await api.get_refund.asyncio_detailed(refund_id, client=anonymous)
    assert denied.status_code == 401 and isinstance(denied.parsed, models.Error)
    with pytest.raises(ValueError):  # a code the document does not enumerate is not read
        models.Error.from_dict({"error": {"code": "no_such_code", "message": "?"}})


# --- TypeScript under node ------------------------------------------------------------------------

NODE_PACKAGES = {"openapi-typescript": "7.13.0", "openapi-fetch": "0.17.0", "typescript": "5.9.3",
                 "@types/node": "20.19.25"}
TSCONFIG = {"compilerOptions": {"target": "es2022", "module": "nodenext", "moduleResolution": "nodenext",
                                "strict": True, "noUncheckedIndexedAccess": True, "skipLibCheck": True,
                                "outDir": "out"}, "files": ["client.ts"]}
TS_CLIENT = """\
// Create, replay, conflict, read, list and errors through a client typed by the generated schema.d.ts.
// tsc --strict checks each use against the document; at run time each answer's fields are exactly those
// the document declares (the Record<keyof T, true> lists below fail to compile if they miss one).
import assert from "node:assert/strict";
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

type S = components["schemas"];
const declared = {
  Accepted: { refund_id: true, external_ref: true, state: true } satisfies Record<keyof S["Accepted"], true>,
  Error: { error: true } satisfies Record<keyof S["Error"], true>,
  ErrorDetail: { code: true, message: true, field: true, request_id: true } satisfies Record<keyof S["ErrorDetail"], true>,
  RefundList: { refunds: true, next_cursor: true } satisfies Record<keyof S["RefundList"], true>,
};
function exactly(kind: keyof typeof declared, value: object): void {
  for (const key of Object.keys(value)) assert.ok(key in declared[kind], `${kind}: ${key} is not in the document`);
}

const [baseUrl, token] = process.argv.slice(2);
const client = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });
const request = (changes: Partial<S["RefundRequest"]> = {}): S["RefundRequest"] => ({
  merchant_id: "m1", original_transaction_id: "CIP-1", amount: "10.00", currency: "PEN", external_ref: "T-1",
  reason: "damaged", ...changes,
});

const created = await client.POST("/v1/refunds", { body: request() });
assert.equal(created.response.status, 202);
const accepted: S["Accepted"] = created.data!;
exactly("Accepted", accepted);

const replay = await client.POST("/v1/refunds", { body: request() });
assert.equal(replay.response.status, 200);
assert.equal(replay.response.headers.get("Idempotent-Replayed"), "true");
assert.deepEqual(replay.data, accepted);

const conflict = await client.POST("/v1/refunds", { body: request({ amount: "20.00" }) });
assert.equal(conflict.response.status, 409);
exactly("Error", conflict.error!);
exactly("ErrorDetail", conflict.error!.error);
assert.equal(conflict.error!.error.request_id, conflict.response.headers.get("X-Request-Id"));

const read = await client.GET("/v1/refunds/{refund_id}", { params: { path: { refund_id: accepted.refund_id } } });
assert.equal(read.response.status, 200);
const refund: S["RefundWithEvents"] = read.data!;
const first: S["Event"] = refund.events[0]!;
assert.equal(refund.refund_id, accepted.refund_id);
assert.equal(first.from_state, null);

await client.POST("/v1/refunds", { body: request({ external_ref: "T-2", amount: "1.00" }) });
const page = await client.GET("/v1/refunds", { params: { query: { merchant_id: "m1", limit: 1 } } });
assert.ok(page.data && "refunds" in page.data);
const list: S["RefundList"] = page.data;
exactly("RefundList", list);
assert.deepEqual(list.refunds.map((r: S["RefundView"]) => r.external_ref), ["T-1"]);
const rest = await client.GET("/v1/refunds", {
  params: { query: { merchant_id: "m1", after: list.next_cursor ?? undefined } },
});
assert.ok(rest.data && "refunds" in rest.data);
assert.deepEqual(rest.data.refunds.map((r) => r.external_ref), ["T-2"]);
assert.equal(rest.data.next_cursor, null);

const refused = await client.POST("/v1/refunds", { body: request({ external_ref: "T-3", amount: "10.001" }) });
assert.equal(refused.response.status, 422);
assert.equal(refused.error!.error.field, "amount");
const code: S["ErrorCode"] = refused.error!.error.code;  // a union of the enumerated codes
assert.equal(code, "invalid_amount");
// @ts-expect-error: a code the document does not enumerate does not compile
const unknown: S["ErrorCode"] = "no_such_code";
assert.ok(unknown);

const anonymous = createClient<paths>({ baseUrl });
const denied = await anonymous.GET("/v1/refunds/{refund_id}", { params: { path: { refund_id: accepted.refund_id } } });
assert.equal(denied.response.status, 401);
exactly("ErrorDetail", denied.error!.error);
console.log("ok");
"""


def node_modules() -> Path:
    """The pinned node packages, installed once per version set in the user's cache (npm registry)."""
    pins = json.dumps(NODE_PACKAGES, sort_keys=True)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refunds-tests"
    folder = home / f"ts-client-{hashlib.sha256(pins.encode()).hexdigest()[:12]}"
    if not (folder / "node_modules" / ".bin" / "tsc").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text(json.dumps({"private": True, "devDependencies": NODE_PACKAGES}))
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return folder / "node_modules"


@pytest.mark.slow
async def test_a_generated_typescript_client_under_node_reads_every_answer(db, make_merchant, intake, tmp_path):
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not installed")
    modules = await asyncio.to_thread(node_modules)
    (tmp_path / "node_modules").symlink_to(modules)
    (tmp_path / "package.json").write_text(json.dumps({"private": True, "type": "module"}))
    (tmp_path / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    (tmp_path / "client.ts").write_text(TS_CLIENT)
    await served_document(intake, tmp_path)
    await make_merchant("m1")
    await paid(db)
    token = (await bearer(db))["Authorization"].removeprefix("Bearer ")

    def run(*argv: str) -> str:
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    bin_ = modules / ".bin"
    await asyncio.to_thread(run, str(bin_ / "openapi-typescript"), "openapi.json", "-o", "schema.d.ts")
    await asyncio.to_thread(run, str(bin_ / "tsc"), "-p", ".")
    assert (await asyncio.to_thread(run, "node", "out/client.js", intake, token)).strip() == "ok"
