"""The error codes: one list (``refunds.http_api.ERRORS``) that the answers are built from and the
OpenAPI document enumerates, per operation and status.

- Read from the source: every code that the intake's and the receiver's code paths can answer
  (``RefundRefused``, ``ApiError``, ``error_response``, ``refuse``, the four-eyes errors' codes,
  the accepting statement's verdicts) is in the list, the intake's in the document's enum, and
  those of ``producers.enqueue``, ``producers.approvals`` and ``refunds.webhooks`` in the
  operations that reach them; nothing in the list is answered by no one.
- Driven through real requests: each answer's code has the status the list gives it and
  validates strictly against its operation's answer for that status.
- A strict validator refuses a code the operation does not answer, an unknown one above all.
- docs/API.md lists exactly these codes with these statuses and meanings.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import producers.http as intake
from producers.http import AIOHTTP_ERRORS, INTAKE_ERRORS, OPERATION_ERRORS, create_app, openapi_document
from refunds.http_api import ERRORS
from refunds.requests import REQUEST_MODELS, refusal_codes
from refunds.tokens import create_token
from tests.helpers import paid
from tests.producers.test_intake import _closed_port, bearer, body

REDIS_DB = 14  # module_redis_url: shared with test_openapi_fuzz (deliveries that nothing consumes)
ROOT = Path(__file__).resolve().parents[2]
INTAKE_SOURCES = [*sorted((ROOT / "producers").glob("*.py")), *sorted((ROOT / "refunds").glob("*.py"))]
RECEIVER_SOURCES = [*sorted((ROOT / "receiver").glob("*.py")), ROOT / "refunds" / "http_api.py"]


# --- the codes the source can answer ------------------------------------------------------------

# the calls that take an error code, and the position of that argument
CODE_ARGUMENT = {"RefundRefused": 0, "ApiError": 0, "error_answer": 0, "error_body": 0, "refuse": 0,
                 "error_response": 1}
CODE_IN_TEXT = re.compile(r'"code":\s*"(\w+)"')  # a body written out by hand (refunds.serving's 503)


class Unreadable(AssertionError):
    pass


def raised_codes(path: Path) -> dict[str, list[str]]:
    """Every error code ``path`` can answer with: code -> where. A code argument whose values
    cannot be read from the source fails (make it a literal, or a name compared with literals)."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    module_level = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
    found: dict[str, list[str]] = {}
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name

    def enclosing(node, kinds=(ast.FunctionDef, ast.AsyncFunctionDef)) -> ast.AST | None:
        while (node := parents.get(node)) is not None:
            if isinstance(node, kinds):
                return node
        return None

    def passes_on(name: str, function) -> bool:
        """A parameter of a function that itself takes the code (``refuse(self, code, ...)``)."""
        if function is None or name not in {a.arg for a in function.args.args}:
            return False
        owner = parents.get(function)
        return function.name in CODE_ARGUMENT or (
            function.name == "__init__" and isinstance(owner, ast.ClassDef) and owner.name in CODE_ARGUMENT)

    def values(expr, function) -> set[str] | None:
        """The codes ``expr`` may be; None when they cannot be read; empty for a code passed on
        from an error caught (``exc.code``, ``rule.code``: those are read where they are made)."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        if isinstance(expr, ast.Attribute) and expr.attr == "code":
            return set()
        if isinstance(expr, ast.Name):
            if passes_on(expr.id, function):
                return set()
            codes = set()
            for node in ast.walk(function) if function is not None else ():
                if isinstance(node, (ast.Assign, ast.NamedExpr)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if any(isinstance(t, ast.Name) and t.id == expr.id for t in targets):
                        codes |= values(node.value, function) or set()
                elif (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == expr.id
                      and all(isinstance(op, ast.Eq) for op in node.ops)):
                    codes |= {c.value for c in node.comparators if isinstance(c, ast.Constant)}
            if not codes and expr.id in module_level:
                codes = values(module_level[expr.id], None)
            return codes or None
        codes = {node.value for node in ast.walk(expr) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        for node in ast.walk(expr):
            if isinstance(node, ast.Name) and node.id in module_level:
                codes |= values(module_level[node.id], None) or set()
        return codes or None

    def note(codes, node) -> None:
        for code in codes:
            found.setdefault(code, []).append(f"{where}:{node.lineno}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            position = CODE_ARGUMENT.get(name)
            if name == "__init__" and isinstance(node.func.value, ast.Call):  # super().__init__(code, ...)
                owner = enclosing(node, ast.ClassDef)
                if owner is not None and any(getattr(base, "id", None) in CODE_ARGUMENT for base in owner.bases):
                    position = 0
            if position is None:
                continue
            argument = node.args[position] if len(node.args) > position else next(
                (k.value for k in node.keywords if k.arg == "code"), None)
            if argument is None:
                continue
            codes = values(argument, enclosing(node))
            if codes is None:
                raise Unreadable(f"{where}:{node.lineno}: the code of {name}(...) is not readable")
            note(codes, node)
        elif isinstance(node, ast.ClassDef):
            for statement in node.body:
                target = getattr(statement, "target", None) or (getattr(statement, "targets", None) or [None])[0]
                value = getattr(statement, "value", None)
                if (isinstance(target, ast.Name) and target.id == "code" and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)):
                    note({value.value}, statement)
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            text = node.value.decode(errors="replace") if isinstance(node.value, bytes) else node.value
            note(set(CODE_IN_TEXT.findall(text)), node)
    return found


def codes_of(paths: list[Path]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in paths:
        for code, where in raised_codes(path).items():
            found.setdefault(code, []).extend(where)
    return found


def test_the_scan_reads_every_shape_of_code_it_meets(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text('''
class Refused(RefundRefused):
    code = "class_code"

def verdicts(verdict):
    if verdict == "first":
        return RefundRefused(verdict, "m")
    if verdict == "second":
        return RefundRefused(verdict, "m")

def literal(request, exc):
    error_response(request, "literal", "m")
    raise ApiError(exc.code, "passed on")

def unreadable(request, anything):
    return error_response(request, anything, "m")
''')
    with pytest.raises(Unreadable, match="sample.py:16"):
        raised_codes(source)
    source.write_text(source.read_text().replace("anything, \"m\"", "'x' if anything else 'y', \"m\""))
    assert set(raised_codes(source)) == {"class_code", "first", "second", "literal", "x", "y"}


def test_every_code_the_services_answer_is_listed_and_the_intakes_are_in_the_document():
    intake_codes = codes_of(INTAKE_SOURCES)
    receiver_codes = codes_of(RECEIVER_SOURCES)
    for model in REQUEST_MODELS:  # the rules of the request models, as refunds.requests.refusal applies them
        for code in refusal_codes(model):
            intake_codes.setdefault(code, []).append(f"refunds.requests.{model.__name__}")
    # the scan found the known places, so it reads the source as meant
    assert {"unknown_transaction", "amount_over_refundable", "same_person", "external_ref_conflict", "url_not_allowed",
            "malformed_json", "merchant_not_allowed"} <= set(intake_codes)
    assert {"invalid_signature", "malformed", "forbidden", "request_timeout", "not_found"} <= set(receiver_codes)

    uncatalogued = {code: where for code, where in {**intake_codes, **receiver_codes}.items() if code not in ERRORS}
    assert not uncatalogued, f"answered but not in refunds.http_api.ERRORS: {uncatalogued}"
    served = openapi_document()["components"]["schemas"]["ErrorCode"]["enum"]
    assert set(served) == set(INTAKE_ERRORS)
    missing = {code: where for code, where in intake_codes.items() if code not in served}
    assert not missing, f"answered by the intake but not in the document's ErrorCode enum: {missing}"
    unused = set(ERRORS) - set(intake_codes) - set(receiver_codes) - set(AIOHTTP_ERRORS.values())
    assert not unused, f"listed in refunds.http_api.ERRORS but answered by no service: {unused}"

    # and in the operations that reach them
    for module, operations in (("producers/enqueue.py", ["createRefund"]),
                               ("producers/approvals.py", ["approveRefund", "rejectRefund"]),
                               ("refunds/webhooks.py", ["createWebhook"])):
        for operation in operations:
            outside = set(raised_codes(ROOT / module)) - set(OPERATION_ERRORS[operation])
            assert not outside, f"{module} answers {outside}, which {operation} does not list"


# --- the document: per operation, strict ----------------------------------------------------------

def answer_validator(document: dict, path: str, method: str, status: str) -> Draft202012Validator:
    """A strict JSON Schema 2020-12 validator for the answer ``status`` of an operation."""
    uri = "urn:intake:openapi"
    registry = Registry().with_resource(uri, Resource(contents=document, specification=DRAFT202012))
    pointer = "/".join(part.replace("~", "~0").replace("/", "~1") for part in
                       ("paths", path, method, "responses", status, "content", "application/json", "schema"))
    return Draft202012Validator({"$ref": f"{uri}#/{pointer}"}, registry=registry)


def error_answers(document: dict):
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref") == "#/components/schemas/Error":
                    yield path, method, operation["operationId"], status, schema


def test_each_error_answer_enumerates_its_operations_codes_of_that_status_and_refuses_any_other():
    document = openapi_document()
    seen = set()
    for path, method, operation_id, status, schema in error_answers(document):
        listed = schema["properties"]["error"]["properties"]["code"]["enum"]
        assert listed == [c for c in dict.fromkeys(OPERATION_ERRORS[operation_id]) if ERRORS[c].status == int(status)]
        assert all(f"`{code}`" in document["paths"][path][method]["responses"][status]["description"] for code in listed)
        validator = answer_validator(document, path, method, status)
        for code in listed:
            validator.validate({"error": {"code": code, "message": "m", "request_id": "r"}})
            seen.add((operation_id, code))
        for code in ("no_such_code", *(c for c in INTAKE_ERRORS if c not in listed)):
            assert not validator.is_valid({"error": {"code": code, "message": "m"}}), (operation_id, status, code)
        assert not validator.is_valid({"error": {"code": listed[0], "message": "m", "extra": 1}})
    assert seen == {(operation, code) for operation, codes in OPERATION_ERRORS.items() for code in codes}


# --- real requests ------------------------------------------------------------------------------

@pytest_asyncio.fixture
async def client(db, database_url, module_redis_url):
    async with TestClient(TestServer(create_app(database_url=database_url))) as http:
        yield http


def operation_of(document: dict, method: str, path: str) -> tuple[str, str] | None:
    """The document's path template and method that a request's path matches."""
    for template in document["paths"]:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in document["paths"][template]:
            return template, method.lower()
    return None


async def test_real_requests_answer_their_codes_with_the_listed_status_and_as_documented(
        db, make_merchant, client, monkeypatch):
    document = json.loads(await (await client.get("/openapi.json")).text())
    await make_merchant("m1", approval_threshold=Decimal("50"))
    await make_merchant("m2")
    await make_merchant("ghost")
    await paid(db)
    await paid(db, transaction="CIP-OLD", days_ago=400)
    alice = await bearer(db)
    bob = await bearer(db, "bob")
    ghostly = {"Authorization": f"Bearer {await create_token(db, 'ghostly', ['ghost'])}"}
    await db.execute("DELETE FROM merchants WHERE merchant_id = 'ghost'")  # the token outlives its merchant
    seen: dict[str, int] = {}

    async def expect(code: str, method: str, path: str, **kwargs) -> dict:
        response = await client.request(method, path, **kwargs)
        answer = json.loads(await response.text())
        assert answer["error"]["code"] == code, (method, path, answer)
        assert response.status == ERRORS[code].status, (code, response.status)
        assert answer["error"]["request_id"] == response.headers["X-Request-Id"]
        operation = operation_of(document, method, path.split("?")[0])
        if operation is not None:
            answer_validator(document, *operation, str(response.status)).validate(answer)
        else:
            assert code in document["components"]["schemas"]["ErrorCode"]["enum"]
        seen[code] = response.status
        return answer

    refunds = "/v1/refunds"
    await expect("unauthorized", "POST", refunds, json=body())
    await expect("malformed_json", "POST", refunds, data=b"{not json", headers=alice)
    await expect("body_too_large", "POST", refunds, data=b"x" * 20_000, headers=alice)
    await expect("invalid_body", "POST", refunds, json=[1], headers=alice)
    await expect("unknown_field", "POST", refunds, json={**body(), "ammount": "1"}, headers=alice)
    await expect("missing_field", "POST", refunds, json={k: v for k, v in body().items() if k != "amount"}, headers=alice)
    await expect("invalid_field", "POST", refunds, json=body(external_ref="no spaces"), headers=alice)
    await expect("invalid_amount", "POST", refunds, json=body(amount=10), headers=alice)
    await expect("invalid_currency", "POST", refunds, json=body(currency="EUR"), headers=alice)
    await expect("idempotency_key_mismatch", "POST", refunds, json=body(), headers={**alice, "Idempotency-Key": "other"})
    await expect("merchant_not_allowed", "POST", refunds, json=body(merchant_id="m2"), headers=alice)
    await expect("unknown_merchant", "POST", refunds, json=body(merchant_id="ghost"), headers=ghostly)
    await expect("unknown_transaction", "POST", refunds, json=body(original_transaction_id="CIP-X"), headers=alice)
    await expect("currency_mismatch", "POST", refunds, json=body(currency="USD"), headers=alice)
    await expect("refund_window_closed", "POST", refunds, json=body(original_transaction_id="CIP-OLD"), headers=alice)
    await expect("amount_over_refundable", "POST", refunds, json=body(amount="500.00"), headers=alice)
    await db.execute("UPDATE merchants SET refund_mode = 'off' WHERE merchant_id = 'm1'")
    await expect("refunds_disabled", "POST", refunds, json=body(), headers=alice)
    await db.execute("UPDATE merchants SET refund_mode = DEFAULT WHERE merchant_id = 'm1'")
    waiting = await client.post(refunds, json=body(amount="60.00"), headers=alice)  # over the threshold: waits
    assert waiting.status == 202, await waiting.text()
    refund_id = (await waiting.json())["refund_id"]
    await expect("external_ref_conflict", "POST", refunds, json=body(amount="61.00"), headers=alice)

    await expect("missing_parameter", "GET", refunds, headers=alice)
    await expect("invalid_parameter", "GET", f"{refunds}?merchant_id=m1&state=bogus", headers=alice)
    await expect("invalid_parameter", "GET", f"{refunds}?merchant_id=m1&after=bogus", headers=alice)
    await expect("merchant_not_allowed", "GET", f"{refunds}?merchant_id=m2", headers=alice)
    await expect("not_found", "GET", f"{refunds}?merchant_id=m1&external_ref=nope", headers=alice)
    await expect("invalid_refund_id", "GET", f"{refunds}/not-a-uuid", headers=alice)
    await expect("not_found", "GET", f"{refunds}/{uuid.uuid4()}", headers=alice)

    approve = f"{refunds}/{refund_id}/approve"
    await expect("invalid_field", "POST", approve, json={"message": 5}, headers=bob)
    await expect("unknown_field", "POST", approve, json={"note": "x"}, headers=bob)
    await expect("same_person", "POST", approve, headers=alice)
    assert (await client.post(f"{refunds}/{refund_id}/reject", headers=bob)).status == 200
    await expect("not_awaiting_approval", "POST", approve, headers=bob)
    await expect("not_found", "POST", f"{refunds}/{uuid.uuid4()}/reject", headers=bob)

    webhooks = "/v1/webhooks"
    hook = {"url": "https://hooks.example.com/refunds", "merchants": ["m1"]}
    await expect("invalid_url", "POST", webhooks, json={**hook, "url": "ftp://x"}, headers=alice)
    await expect("url_not_allowed", "POST", webhooks, json={**hook, "url": "http://127.0.0.1/x"}, headers=alice)
    await expect("merchant_not_allowed", "POST", webhooks, json={**hook, "merchants": ["m2"]}, headers=alice)
    await expect("unknown_merchant", "POST", webhooks, json={**hook, "merchants": ["ghost"]}, headers=ghostly)
    await expect("invalid_endpoint_id", "POST", f"{webhooks}/nope/disable", headers=alice)
    await expect("not_found", "POST", f"{webhooks}/{uuid.uuid4()}/rotate-secret", headers=alice)

    await expect("not_found", "GET", "/v1/nowhere")
    await expect("method_not_allowed", "DELETE", refunds, headers=alice)

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(intake, "find_refund", broken)
    await expect("internal_error", "GET", f"{refunds}/{refund_id}", headers=alice)

    # not driven here: a body that never arrives (request_timeout, tests/producers/test_http_limits.py),
    # an outage (unavailable, test_intake.py), the four-eyes refusal without a code of its own and the
    # event types webhooks.add_endpoint refuses (both unreachable past the models), a validation
    # outside refunds.requests.validated (a bug), a requester unnamed (the intake names the token;
    # tests/producers/test_producers.py drives it through the Python API)
    not_driven = {"request_timeout", "unavailable", "approval_refused", "invalid_event_types", "invalid_request",
                  "requester_unnamed"}
    # (unavailable: test_an_outage_answers_unavailable_as_documented, below)
    assert set(INTAKE_ERRORS) - set(seen) == not_driven


async def test_an_outage_answers_unavailable_as_documented(db, module_redis_url):
    app = create_app(database_url=f"postgresql://postgres@127.0.0.1:{_closed_port()}/nothing")
    async with TestClient(TestServer(app)) as http:
        response = await http.get(f"/v1/refunds/{uuid.uuid4()}", headers={"Authorization": "Bearer rk_x"})
        answer = await response.json()
    assert (response.status, answer["error"]["code"]) == (503, "unavailable")
    answer_validator(openapi_document(), "/v1/refunds/{refund_id}", "get", "503").validate(answer)


# --- docs/API.md ----------------------------------------------------------------------------------

def test_the_api_doc_lists_every_code_with_its_status_and_meaning():
    text = (ROOT / "docs" / "API.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (\d{3}) \| (.+?) \|$", text, flags=re.MULTILINE)
    assert [(code, int(status), meaning) for code, status, meaning in rows] == [
        (e.code, e.status, e.meaning.replace("|", "\\|")) for e in ERRORS.values()]
