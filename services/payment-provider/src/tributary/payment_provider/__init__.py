"""A stand-in for an external payment provider: checkouts, payments, refunds, signed webhooks."""
