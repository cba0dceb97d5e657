import sys

from localpers.cli.cli import main

sys.exit(main())
