"""`python -m convert`."""

from .cli import main

main()
