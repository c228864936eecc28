from dicomd.cli import main

raise SystemExit(main())
