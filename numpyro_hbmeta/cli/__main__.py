"""``python -m numpyro_hbmeta.cli``: the ``hbmeta`` command."""

from numpyro_hbmeta.cli.main import main

raise SystemExit(main())
