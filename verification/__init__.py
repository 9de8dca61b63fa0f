"""Everything that judges a suspect: protocols per method, suspect adapters, attacks, reports."""
