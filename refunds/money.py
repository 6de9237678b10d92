"""Money is Decimal with exactly two places; floats are refused, never rounded."""

from decimal import Decimal, InvalidOperation

from .errors import RefundRefused

CURRENCIES = ("PEN", "USD")
CENT = Decimal("0.01")
MAX_AMOUNT = Decimal("999999999999.99")


def parse_amount(value: object, field: str = "amount") -> Decimal:
    """Parse a decimal string (or Decimal) with at most 2 decimals into a positive Decimal."""
    if isinstance(value, bool) or isinstance(value, float):
        raise RefundRefused("invalid_amount", f"{field} must be a decimal string such as \"10.50\", not a float", field)
    if isinstance(value, int):
        value = Decimal(value)
    if isinstance(value, str):
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            raise RefundRefused("invalid_amount", f"{field} {value!r} is not a decimal number", field) from None
    if not isinstance(value, Decimal) or not value.is_finite():
        raise RefundRefused("invalid_amount", f"{field} must be a decimal string", field)
    if value.as_tuple().exponent < -2:
        raise RefundRefused("invalid_amount", f"{field} {value} has more than 2 decimals", field)
    if value <= 0:
        raise RefundRefused("invalid_amount", f"{field} must be greater than 0", field)
    if value > MAX_AMOUNT:
        raise RefundRefused("invalid_amount", f"{field} {value} is too large", field)
    return value.quantize(CENT)


def parse_currency(value: object, field: str = "currency") -> str:
    if value not in CURRENCIES:
        raise RefundRefused("invalid_currency", f"{field} must be one of {', '.join(CURRENCIES)}", field)
    return value  # type: ignore[return-value]


def format_amount(value: Decimal) -> str:
    return str(value.quantize(CENT))
