from jax_attn.cli import main

raise SystemExit(main())
