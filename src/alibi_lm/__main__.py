import sys

from alibi_lm.cli import main

sys.exit(main())
