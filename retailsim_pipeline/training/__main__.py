from retailsim_pipeline.training.run import main

raise SystemExit(main())
