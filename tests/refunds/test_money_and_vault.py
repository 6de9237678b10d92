from decimal import Decimal

import pytest

from refunds.errors import RefundRefused, VaultError
from refunds.money import parse_amount, parse_currency
from refunds.vault import Vault


@pytest.mark.parametrize("value", [10.5, "10.505", "0", "-1", "abc", "NaN", "Infinity", True, None, Decimal("NaN"),
                                   "1e3", "5_0", "\u0665", "+5", " 7", "7 ", "1,50", "1.", ".5", "0x10"])
def test_bad_amounts_are_refused_naming_the_field(value):
    """One rule for every amount (refunds, payments, notifications): "1e3", "5_0" or an Arabic-Indic
    five are valid Python Decimals, and are refused here as a refund request refuses them."""
    with pytest.raises(RefundRefused) as refused:
        parse_amount(value)
    assert refused.value.field == "amount"


@pytest.mark.parametrize(("value", "message"), [
    ("-3", "amount must be greater than 0"),
    ("0.00", "amount must be greater than 0"),
    ("10.005", "amount 10.005 has more than 2 decimals"),
    ("99999999999999999999999", "amount 99999999999999999999999 is over 999999999999.99"),
    ("1e3", 'amount must be a decimal string with at most 2 decimals, such as "10.50"'),
    (10.5, 'amount must be a decimal string with at most 2 decimals, such as "10.50", not a float'),
])
def test_a_refused_amount_is_told_what_is_wrong_with_it(value, message):
    with pytest.raises(RefundRefused) as refused:
        parse_amount(value)
    assert refused.value.message == message


def test_a_gateways_json_number_is_an_amount():
    assert parse_amount(22) == Decimal("22.00") and parse_amount(Decimal("22.05")) == Decimal("22.05")


def test_good_amounts_have_two_places():
    assert parse_amount("10.5") == Decimal("10.50")
    assert str(parse_amount("7")) == "7.00"


def test_currency():
    assert parse_currency("USD") == "USD"
    with pytest.raises(RefundRefused):
        parse_currency("EUR")


def test_vault_binds_identity_and_key():
    vault = Vault(b"k" * 32)
    sealed = vault.seal(b"secret", "merchant:m1:secret_key")
    assert b"secret" not in sealed
    assert vault.open(sealed, "merchant:m1:secret_key") == b"secret"
    with pytest.raises(VaultError):
        vault.open(sealed, "merchant:m2:secret_key")  # moved to another row
    with pytest.raises(VaultError):
        Vault(b"x" * 32).open(sealed, "merchant:m1:secret_key")
