"""The PagoEfectivo provider: protocol (signing, time, codes), client, and the sandbox gateway."""
