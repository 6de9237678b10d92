from decimal import Decimal

import pytest

from refunds.errors import RefundRefused, VaultError
from refunds.money import parse_amount, parse_currency
from refunds.vault import Vault


@pytest.mark.parametrize("value", [10.5, "10.505", "0", "-1", "abc", "NaN", "Infinity", True, None])
def test_bad_amounts_are_refused_naming_the_field(value):
    with pytest.raises(RefundRefused) as refused:
        parse_amount(value)
    assert refused.value.field == "amount"


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
