"""The `kerasbn` command line (installed as the `kerasbn_cli` package)."""
