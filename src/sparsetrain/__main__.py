import sys

from sparsetrain.cli import main

sys.exit(main())
