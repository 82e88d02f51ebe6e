from jax_attn.apps.cli import main

raise SystemExit(main())
