"""`python -m alm_jax ...` = the `alm` command."""

from alm_jax.cli import main

raise SystemExit(main())
