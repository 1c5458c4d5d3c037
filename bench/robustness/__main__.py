import sys

from bench.robustness.run import main

sys.exit(main())
