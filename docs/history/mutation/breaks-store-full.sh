#!/bin/sh
# store/store.py: the non-equivalent survivors and unreached mutants of the samples with the fixed harness
# (seeds 28 and 7, 30 of 3,093 each), as breaks against the new tests of test_store.py.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/store/store.py
T=tests/test_store.py
K="read_only_store_reads or sweep_temp_deletes or retiring_artifacts or documented_place or make_private_leaves or keeps_the_source"
R='                    settings = dict(conn.execute("SELECT name, value FROM settings"))'
$B $F "$R" '                    settings = dict(conn.execute(None))' -- $T -k "$K"
$B $F "$R" '                    settings = dict(conn.execute("XXSELECT name, value FROM settingsXX"))' -- $T -k "$K"
$B $F 'if "kdf" not in settings:
                raise' 'if "KDF" not in settings:
                raise' -- $T -k "$K"
$B $F 'not set(ARTIFACT_COLUMNS) <= columns' 'not set(None) <= columns' -- $T -k "$K"
$B $F 'if user_id is not None and int(parts[1]) != user_id:' 'if user_id is not None or int(parts[1]) != user_id:' -- $T -k "$K"
$B $F 'gone = conn.execute(sql, args).fetchall()' 'gone = conn.execute(args).fetchall()' -- $T -k "$K"
$B $F 'Path(directory) / "sync" / "signals"' 'Path(directory) / "XXsyncXX" / "signals"' -- $T -k "$K"
$B $F 'os.chmod(os.path.join(root, f), 0o600)' 'os.chmod(os.path.join(root, f), None)' -- $T -k "$K"
$B $F 'paths = self._learn(conn, user_id, found, out, source=source)' 'paths = self._learn(conn, user_id, found, out, )' -- $T -k "$K"
$B $F 'self.cipher.seal(data, _response_aad(user_id, response_id))' 'self.cipher.seal(_response_aad(user_id, response_id))' -- $T -k "$K"
$B $F '(", …" if len(unique) > n else "")' '(", …" if (len(unique) > n) and False else "")' -- $T -k import_formats
