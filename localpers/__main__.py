import sys

from localpers.cli import main

sys.exit(main())
