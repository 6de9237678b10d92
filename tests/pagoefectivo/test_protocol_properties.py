"""Properties of the signatures, for any request hypothesis can think of.

Refund requests: sign → (JSON on the wire) → verify holds; changing any one field's value,
or verifying with another merchant's key, fails. Notifications: flipping any byte of the
body, or any bit of the signature, fails the HMAC check.

One fixed key (tests/fixtures) signs; one generated key is "another merchant". RSA signing
costs about 2 ms, so the example counts keep the module well under 20 seconds.
"""

from __future__ import annotations

from decimal import Decimal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
import pytest

from pagoefectivo import protocol
from tests.helpers import FIXTURES

KEY_PEM = (FIXTURES / "merchant_test_key.pem").read_bytes()
KEY = protocol.load_private_key(KEY_PEM)
PUBLIC = protocol.public_key_pem(KEY_PEM)
OTHER_PUBLIC = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# any Unicode a JSON producer can send: everything but lone surrogates (not encodable as UTF-8)
text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
identifiers = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=64)
amounts = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("999999999.99"), places=2,
                      allow_nan=False, allow_infinity=False)


@st.composite
def refund_requests(draw) -> dict:
    fields = {
        "merchantId": draw(identifiers),
        "originalTransactionId": draw(st.one_of(identifiers, st.integers(1, 10**12).map(str))),
        "refundAmount": draw(amounts),
        "currency": draw(st.sampled_from(["PEN", "USD"])),
        "externalRef": draw(identifiers),
        "notifyUrl": "https://example.test/n/" + draw(st.text("abcdefghij-_/0123456789", max_size=20)),
        "timestamp": draw(st.datetimes(timezones=st.timezones()).filter(lambda d: 1900 < d.year < 9999).map(
            protocol.lima_timestamp)),
    }
    reason = draw(st.one_of(st.none(), text))
    if reason is not None:
        fields["refundReason"] = reason
    return fields


def over_the_wire(fields: dict) -> dict:
    """What the gateway receives: the JSON body, numbers parsed as Decimal."""
    return protocol.loads(protocol.dumps(fields))


def different_value(data, name: str, current):
    """Another value for one field, one that differs in the canonical string."""
    if name == "refundAmount":
        other = data.draw(amounts.filter(lambda a: a != current))
    elif name == "currency":
        other = "USD" if current == "PEN" else "PEN"
    elif name == "timestamp":
        other = data.draw(st.datetimes(timezones=st.timezones()).filter(lambda d: 1900 < d.year < 9999).map(
            protocol.lima_timestamp).filter(lambda t: t != current))
    else:
        other = data.draw(text.filter(lambda t: t != str(current)))
    return other


@pytest.mark.slow
@FAST
@given(refund_requests())
def test_signed_requests_verify_after_the_wire(fields):
    signature = protocol.sign_fields(fields, KEY)
    received = over_the_wire({**fields, "signature": signature})
    assert protocol.verify_fields(received, received["signature"], PUBLIC)
    assert not protocol.verify_fields(received, received["signature"], OTHER_PUBLIC)


@pytest.mark.slow
@FAST
@given(refund_requests(), st.data())
def test_changing_any_single_field_breaks_the_signature(fields, data):
    signature = protocol.sign_fields(fields, KEY)
    name = data.draw(st.sampled_from(sorted(fields)))
    changed = {**fields, name: different_value(data, name, fields[name])}
    assert not protocol.verify_fields(over_the_wire(changed), signature, PUBLIC)


@pytest.mark.slow
@FAST
@given(refund_requests(), text)
def test_adding_or_dropping_the_optional_reason_breaks_the_signature(fields, reason):
    signature = protocol.sign_fields(fields, KEY)
    if "refundReason" in fields:
        changed = {k: v for k, v in fields.items() if k != "refundReason"}
    else:
        changed = {**fields, "refundReason": reason}
    assert not protocol.verify_fields(changed, signature, PUBLIC)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=2048), st.data())
def test_flipping_any_body_byte_breaks_the_notification_signature(body, data):
    secret = data.draw(text)
    signature = protocol.notification_signature(body, secret)
    assert protocol.verify_notification(body, signature, secret)
    index = data.draw(st.integers(0, len(body) - 1))
    mask = data.draw(st.integers(1, 255))
    flipped = body[:index] + bytes([body[index] ^ mask]) + body[index + 1:]
    assert not protocol.verify_notification(flipped, signature, secret)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), text, st.data())
def test_changing_any_bit_or_digit_of_the_signature_breaks_it(body, secret, data):
    signature = protocol.notification_signature(body, secret)
    raw = bytes.fromhex(signature)
    index = data.draw(st.integers(0, len(raw) - 1))
    mask = data.draw(st.integers(1, 255))
    flipped = raw[:index] + bytes([raw[index] ^ mask]) + raw[index + 1:]
    assert not protocol.verify_notification(body, flipped.hex(), secret)
    # any other hex digit at any position (upper case is the same value, so not "another")
    position = data.draw(st.integers(0, len(signature) - 1))
    digit = data.draw(st.sampled_from("0123456789abcdef").filter(lambda d: d != signature[position]))
    assert not protocol.verify_notification(body, signature[:position] + digit + signature[position + 1:], secret)
    assert not protocol.verify_notification(body, signature[:-1], secret)  # truncated
    assert not protocol.verify_notification(body, signature, secret + "x")  # another secret


@FAST
@given(st.binary(max_size=256), text)
def test_json_bodies_are_signed_as_raw_bytes(extra, secret):
    """The receiver must verify the bytes it got, not a re-serialization: the same JSON
    written with other spacing is other bytes, and does not verify."""
    body = protocol.dumps({"eventType": "refund.succeeded", "operationNumber": "1", "data": {"x": extra.hex()}})
    signature = protocol.notification_signature(body, secret)
    respaced = body.replace(b",", b", ")
    assume(respaced != body)
    assert not protocol.verify_notification(respaced, signature, secret)
