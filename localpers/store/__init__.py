"""The store layer: a user's history on this machine.

Owns: the SQLite history store with its artifact registry and job queue (store), and the BM25 / dense retrieval
indexes over it (retrieval).
May import: localpers.names, localpers.errors, localpers.model, localpers.engine.
"""
