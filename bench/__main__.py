"""``python -m bench``: the benchmark suite (same as ``gpuce bench``)."""

from gpuce.benchmark import main

raise SystemExit(main())
