"""Migration scripts, one per schema change, applied in order by `dragonrec.store.migrate`."""
