"""The local stack's own parts: what bootstrap starts so that the demo and the tests have
real things to reach on a machine with no internet."""
