import sys

from tricklm.model.native import main

sys.exit(main())
