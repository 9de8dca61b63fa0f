"""MedLocker core (MIAD-MARK is its delta variant): logo, regions, placement, delta, keyed removal, removal attacks."""
