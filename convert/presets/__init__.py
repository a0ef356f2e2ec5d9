"""Shipped rules files (`--preset NAME`)."""
