import sys

from nightlab.loop.engine.process import main

sys.exit(main())
