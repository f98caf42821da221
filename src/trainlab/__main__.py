"""`python -m trainlab` is the `train` command."""

from trainlab.cli import main

main()
