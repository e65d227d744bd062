from retailsim_pipeline.cli import main

raise SystemExit(main())
