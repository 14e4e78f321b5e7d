from tricklm.cli import main

raise SystemExit(main())
