"""The sync layer: private community aggregates through Flower (SecAgg+, differential privacy).

Owns: the device- and server-side privacy arithmetic and ledger (sync) and the Flower app (sync_app).
May import: localpers.names, localpers.errors, localpers.model, localpers.engine, localpers.store,
localpers.personalize; never localpers.serve, localpers.eval or localpers.cli.
"""
