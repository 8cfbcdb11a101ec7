"""`python -m modelkin`: the command line."""

from .cli import main

main()
