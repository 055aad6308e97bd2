import sys

from ddx.convert import main

sys.exit(main())
