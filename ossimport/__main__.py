from ossimport.cli import main

raise SystemExit(main())
