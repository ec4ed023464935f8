"""`python -m loralab` is the same CLI as the `loralab` console script."""

from loralab.cli import main

raise SystemExit(main())
