import sys

from gridfeats.cli import main

sys.exit(main())
