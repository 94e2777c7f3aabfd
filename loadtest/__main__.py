"""`python -m loadtest ...`: see loadtest/cli.py or `python -m loadtest --help`."""

from loadtest.cli import main

raise SystemExit(main())
