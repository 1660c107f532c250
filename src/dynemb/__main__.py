"""`python -m dynemb ...`: the `dynemb` command where no console script is installed
(the GPU benchmark's machine runs the checkout from a path entry)."""

from dynemb.cli import main

main()
