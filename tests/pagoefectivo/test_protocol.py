"""Signing and verification against fixed vectors (cross-checked with openssl)."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from pagoefectivo import protocol
from tests.helpers import FIXTURES

KEY_PEM = (FIXTURES / "merchant_test_key.pem").read_bytes()
REFUND_FIELDS = {
    "merchantId": "m1",
    "originalTransactionId": "123456",
    "refundAmount": Decimal("10.5"),
    "currency": "PEN",
    "externalRef": "R-1",
    "notifyUrl": "https://example.test/n",
    "timestamp": "2026-11-25T10:00:00-05:00",
    "refundReason": "",
}
CANONICAL = (
    "currency=PEN&externalRef=R-1&merchantId=m1&notifyUrl=https://example.test/n"
    "&originalTransactionId=123456&refundAmount=10.50&timestamp=2026-11-25T10:00:00-05:00"
)
# printf '%s' "$CANONICAL" | openssl dgst -sha256 -sign tests/fixtures/merchant_test_key.pem | base64 -w0
SIGNATURE = (
    "hUtCDurpv4hBmh/iubB+8sLaz/9j1MOKlSXVNVMJZXdHf9kKmfC5NDlEO+GDYQOYhoAo/RfxIX333h4RsWdnFp9zVKPu/eN2h228MSH1"
    "WzOIEwKVi1Y+7eB1UfkT64A1c57/VyselF8fkAlVeEyL2O9RLzdsQq1mC3xEmaQ6GXJvuifQ1sOGbiyYQHYDu7qHkkX9jL/ojO5eaPVq"
    "WzKLRYyzHpMBAWK2YI0XiaaDzyNJotr8Ozt7vRMEZnsGCaJgpNucWb85mClosBomuTWt22eiNa1uyugaSNT1FZGRFpOv/6VImq/uu1ux"
    "U5LFIdiJDBaIYHpkL4FTEdiG8OI6dQ=="
)


def test_published_authorization_example():
    digest = protocol.auth_hash(8, "AKIPJP77AHN2DKVIJURB", "Nfybo8h0yN7CFN1ycX+XaG99pj/y3Vt25urt1LUR",
                                "2018-11-20T16:01:00-05:00")
    assert digest == "3faa0677fe78c30800d5c9ec71218ddaa81d15ca08e39f50177bbe328906c744"


def test_canonical_string_sorts_skips_empty_and_formats_amounts():
    assert protocol.canonical_string({**REFUND_FIELDS, "signature": "x"}) == CANONICAL


def test_refund_signature_fixed_vector_and_verification():
    key = protocol.load_private_key(KEY_PEM)
    assert protocol.sign_fields(REFUND_FIELDS, key) == SIGNATURE
    public = protocol.public_key_pem(KEY_PEM)
    assert protocol.verify_fields(REFUND_FIELDS, SIGNATURE, public)
    assert not protocol.verify_fields({**REFUND_FIELDS, "refundAmount": Decimal("10.51")}, SIGNATURE, public)
    assert not protocol.verify_fields(REFUND_FIELDS, "not base64!", public)


def test_notification_hmac_fixed_vector():
    body = b'{"eventType":"cip.paid"}'
    # printf '%s' "$body" | openssl dgst -sha256 -hmac s3cr3t
    expected = "1c93840a3168f5aa6b4af7409fa104f9521c7284c1bda43a37f23a5cbb663cb9"
    assert protocol.notification_signature(body, "s3cr3t") == expected
    assert protocol.verify_notification(body, expected.upper(), "s3cr3t")
    assert not protocol.verify_notification(body + b" ", expected, "s3cr3t")
    assert not protocol.verify_notification(body, None, "s3cr3t")


def test_lima_time_at_the_wire():
    moment = datetime(2026, 11, 25, 15, 0, 0, tzinfo=timezone.utc)
    assert protocol.lima_timestamp(moment) == "2026-11-25T10:00:00-05:00"
    assert protocol.parse_timestamp("2026-11-25T10:00:00-05:00") == moment
    with pytest.raises(ValueError):
        protocol.lima_timestamp(datetime(2026, 11, 25, 15, 0, 0))
    assert protocol.within_tolerance("2026-11-25T10:04:59-05:00", moment)
    assert not protocol.within_tolerance(protocol.lima_timestamp(moment + timedelta(minutes=6)), moment)
    assert not protocol.within_tolerance("2026-11-25T10:00:00", moment)


def test_json_keeps_decimals_exact():
    raw = protocol.dumps({"refundAmount": Decimal("10.50")})
    assert raw == b'{"refundAmount":10.50}'
    assert protocol.loads(raw)["refundAmount"] == Decimal("10.50")


def test_signed_refund_request_is_the_documented_example():
    """docs/PROTOCOL.md shows this body; the signature is the openssl vector above."""
    body = protocol.signed_refund_request(
        merchant_id="m1", original_transaction_id="123456", amount=Decimal("10.5"), currency="PEN",
        external_ref="R-1", notify_url="https://example.test/n", reason="", moment=datetime(2026, 11, 25, 15, 0,
                                                                                            tzinfo=timezone.utc),
        private_key=protocol.load_private_key(KEY_PEM))
    assert body == {**{k: v for k, v in REFUND_FIELDS.items() if v != ""}, "refundAmount": Decimal("10.50"),
                    "signature": SIGNATURE}
    assert protocol.dumps(body).startswith(b'{"merchantId":"m1","originalTransactionId":"123456","refundAmount":10.50,')


def test_status_path_and_answer():
    assert protocol.refund_status_path("R/1 ñ") == "/v1/refunds/R%2F1%20%C3%B1"
    assert protocol.refund_answer({"refundId": "X", "externalRef": "R-1", "status": "failure", "reasonCode": "701",
                                   "reason": "declined"}) == {
        "status": "failure", "refund_id": "X", "external_ref": "R-1", "code": "701", "message": "declined"}


def test_lima_time_is_the_published_rule_for_signed_times():
    """dateRequest is "(GTM-5) Hora Lima" (API CIP 1.1 §5.1.1): the same instant in another offset is refused."""
    moment = datetime(2026, 11, 25, 15, 0, tzinfo=timezone.utc)
    assert protocol.parse_lima_timestamp("2026-11-25T10:00:00-05:00") == moment
    assert protocol.parse_lima_timestamp("2026-11-25T10:00:00-0500") == moment  # "(+/-)zzzz"
    for other in ("2026-11-25T15:00:00+00:00", "2026-11-25T15:00:00Z", "2026-11-25T10:00:00"):
        with pytest.raises(ValueError):
            protocol.parse_lima_timestamp(other)
        assert not protocol.within_tolerance(other, moment)
