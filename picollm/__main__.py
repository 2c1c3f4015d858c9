import sys

from picollm.cli import main

sys.exit(main())
