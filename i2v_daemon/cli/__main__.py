"""`python -m i2v_daemon.cli`: the same entry point as the `i2v-daemon` command."""

from i2v_daemon.cli.main import main

raise SystemExit(main())
