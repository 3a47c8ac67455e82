"""``python -m simple_oci_registry`` runs the command-line interface."""

from simple_oci_registry.cli import main

raise SystemExit(main())
