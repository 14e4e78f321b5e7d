import sys

from tricklm.model.native.decoder import main

sys.exit(main())
