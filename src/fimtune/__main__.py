from fimtune.cli import main

raise SystemExit(main())
