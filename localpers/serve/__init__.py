"""The serving layer: compose artifacts per request and answer over HTTP.

Owns: the composer (compose), the OpenAI-compatible server (server), learning from chat (learn), the background
job worker (jobs) and the memory routes (memory_api).
May import: every layer below it (names, errors, kernels, model, engine, store, personalize); never localpers.sync,
localpers.eval or localpers.cli.
"""
