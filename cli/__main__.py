"""``python -m kerasbn_cli``: the `kerasbn` command, where the console script is not on the PATH."""

from kerasbn_cli.main import main

main()
