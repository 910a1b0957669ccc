"""The `mhc` command line (installed as mhc_aot.cli)."""
