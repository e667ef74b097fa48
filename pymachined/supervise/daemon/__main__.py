"""``python -m pymachined.supervise.daemon`` runs pymachined in the foreground."""

from pymachined.supervise.daemon.server import main

raise SystemExit(main())
