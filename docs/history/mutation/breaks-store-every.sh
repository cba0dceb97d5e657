#!/bin/sh
# store/store.py, every mutant (partial: the run's 4,800 s limit): each survivor judged a missing test, made as a
# break and run against the new tests of tests/test_store.py (each fixed mutant also re-run with --mutants:
# localpers.store.store.rerun.txt). Run from the repository root; never commit while it runs.
P=${PYTHON:-/work/venv/bin/python}
B="$P bench/experiments/break_once.py"
F=localpers/store/store.py
T=tests/test_store.py
K="every_replaced or facts_and_sources or told_the_limit or kept_responses_need or queued_jobs_place or artifact_folder_and or indexes_scratch or full_disk_and or unset_it or broken_file_marks or as_plain_text or full_disk_at_open or old_registry or without_vacuum or holds_the_store_open or jobs_artifact_registers or fresh_store_registers or queues_what_they_fed or routed_edits_lose or embeds_every_item or first_five"
$B $F 'gone = [i for i, v in held if v == value or not fact.key]' 'gone = [i for i, v in held if v == value or fact.key]' -- $T -k "$K"
$B $F 'out["retired"] += [' 'out["retired"] = [' -- $T -k "$K"
$B $F '[{"id": i, "attribute": self._fact_attribute(conn, user_id, i)} for i in gone]' '[{"XXidXX": i, "attribute": self._fact_attribute(conn, user_id, i)} for i in gone]' -- $T -k "$K"
$B $F '[{"id": i, "attribute": self._fact_attribute(conn, user_id, i)} for i in gone]' '[{"id": i, "XXattributeXX": self._fact_attribute(conn, user_id, i)} for i in gone]' -- $T -k "$K"
$B $F '[{"id": i, "attribute": self._fact_attribute(conn, user_id, i)} for i in gone]' '[{"id": i, "attribute": self._fact_attribute(conn, user_id, None)} for i in gone]' -- $T -k "$K"
$B $F 'self._mark_superseded(conn, user_id, gone, message_id)' 'self._mark_superseded(conn, user_id, gone, None)' -- $T -k "$K"
$B $F 'paths += self._delete(conn, user_id, gone)
                    continue' 'paths += self._delete(conn, user_id, gone)
                    break' -- $T -k "$K"
$B $F 'if self._edit_failed(conn, user_id):' 'if self._edit_failed(conn, None):' -- $T -k "$K"
$B $F '                        self._queue(conn, user_id, names.EDIT)' '                        self._queue(conn, user_id, None)' -- $T -k "$K"
$B $F 'out["retried"] += [' 'out["retried"] -= [' -- $T -k "$K"
$B $F 'out["retried"] += [' 'out["XXretriedXX"] += [' -- $T -k "$K"
$B $F '[{"id": i, "attribute": fact.attribute} for i, v in held' '[{"XXidXX": i, "attribute": fact.attribute} for i, v in held' -- $T -k "$K"
$B $F '[{"id": i, "attribute": fact.attribute} for i, v in held' '[{"id": i, "XXattributeXX": fact.attribute} for i, v in held' -- $T -k "$K"
$B $F 'for i, v in held if v == value]
                    continue' 'for i, v in held if v == value]
                    break' -- $T -k "$K"
$B $F 'out["replaced"] += [' 'out["replaced"] = [' -- $T -k "$K"
$B $F 'out["replaced"] += [{"id": i, "attribute":' 'out["replaced"] += [{"id": i, "XXattributeXX":' -- $T -k "$K"
$B $F 'self._fact_attribute(conn, user_id, i)}
' 'self._fact_attribute(conn, user_id, None)}
' -- $T -k "$K"
$B $F 'self._mark_superseded(conn, user_id, [i for i, _ in held], message_id)' 'self._mark_superseded(conn, user_id, [i for i, _ in held], None)' -- $T -k "$K"
$B $F 'source: str = "chat") -> list[str]:' 'source: str = "XXchatXX") -> list[str]:' -- $T -k "$K"
$B $F 'row = conn.execute("SELECT meta FROM items WHERE id = ?", (item_id,)).fetchone()' 'row = None' -- $T -k "$K"
$B $F '.get("attribute") if row else None' '.get("XXattributeXX") if row else None' -- $T -k "$K"
$B $F 'if m != by]' 'if m == by]' -- $T -k "$K"
$B $F '            if row is not None:
                meta = _read_meta' '            if row is None:
                meta = _read_meta' -- $T -k "$K"
$B $F 'encode("utf-8"), aad), message_id))' 'encode("utf-8"), None), message_id))' -- $T -k "$K"
$B $F 'json.dumps(meta, ensure_ascii=False).encode("utf-8"), aad), message_id))' 'json.dumps(None, ensure_ascii=False).encode("utf-8"), aad), message_id))' -- $T -k "$K"
$B $F 'return row is not None and row[0] == names.FAILED' 'return row is None and row[0] == names.FAILED' -- $T -k "$K"
$B $F 'meta.get("attribute_type")' 'meta.get(None)' -- $T -k "$K"
$B $F 'attribute = attribute[-1] if attribute else None' 'attribute = None' -- $T -k "$K"
$B $F 'attribute = attribute[-1] if attribute else None' 'attribute = attribute[-1] if (attribute) or True else None' -- $T -k "$K"
$B $F 'attribute = attribute[-1] if attribute else None' 'attribute = attribute[+1] if attribute else None' -- $T -k "$K"
$B $F '"attribute": attribute if isinstance(attribute, str) else None' '"attribute": attribute if (isinstance(attribute, str)) or True else None' -- $T -k "$K"
$B $F 'meta.get("value", item["text"])' 'meta.get("value", None)' -- $T -k "$K"
$B $F '"message": meta.get("message"), "created"' '"XXmessageXX": meta.get("message"), "created"' -- $T -k "$K"
$B $F '"message": meta.get("message"), "created"' '"message": meta.get(None), "created"' -- $T -k "$K"
$B $F '"created": item["ts"], "status": "current"' '"XXcreatedXX": item["ts"], "status": "current"' -- $T -k "$K"
$B $F '"created": item["ts"], "status": "current"' '"created": item["ts"], "XXstatusXX": "current"' -- $T -k "$K"
$B $F '"created": item["ts"], "status": "current"' '"created": item["ts"], "status": "XXcurrentXX"' -- $T -k "$K"
$B $F 'source: str = "remember") -> dict:
        """Store one message' 'source: str = "REMEMBER") -> dict:
        """Store one message' -- $T -k "$K"
$B $F 'return self.learn_texts(user, [text], extract, limit, source=source)' 'return self.learn_texts(user, [text], extract, None, source=source)' -- $T -k "$K"
$B $F 'return self.learn_texts(user, [text], extract, limit, source=source)' 'return self.learn_texts(user, [text], extract, source=source)' -- $T -k "$K"
$B $F 'source: str = "remember") -> dict:
        """learn_text for several' 'source: str = "REMEMBER") -> dict:
        """learn_text for several' -- $T -k "$K"
$B $F 'found = [(item, extract(text, limit, previous)[:limit])' 'found = [(item, extract(text, None, previous)[:limit])' -- $T -k "$K"
$B $F 'checked.append(check_item(message["content"], "message",' 'checked.append(check_item(message["content"], "XXmessageXX",' -- $T -k "$K"
$B $F 'row = conn.execute("SELECT id FROM users WHERE name = ?", (check_user(user),)).fetchone()
            seen' 'row = None
            seen' -- $T -k "$K"
$B $F 'found = {d: extract(text, limit, previous)[:limit]' 'found = {d: extract(text, None, previous)[:limit]' -- $T -k "$K"
$B $F 'found = {d: extract(text, limit, previous)[:limit]' 'found = {d: extract(text, limit, None)[:limit]' -- $T -k "$K"
$B $F 'found = {d: extract(text, limit, previous)[:limit]' 'found = {d: extract(text, previous)[:limit]' -- $T -k "$K"
$B $F 'unicodedata.normalize("NFC", str(name))' 'unicodedata.normalize("NFC", str(None))' -- $T -k "$K"
$B $F 'if not isinstance(response_id, str) or not response_id:' 'if not isinstance(response_id, str) and not response_id:' -- $T -k "$K"
$B $F 'raise UserError("a response id must be a non-empty string")' 'raise UserError(None)' -- $T -k "$K"
$B $F 'max(keep, 0)' 'max(keep, 1)' -- $T -k "$K"
$B $F 'responses = self._responses(conn, user_id)' 'responses = None' -- $T -k "$K"
$B $F '"responses": responses,' '"XXresponsesXX": responses,' -- $T -k "$K"
$B $F '"position": places.get(row[0])' '"position": places.get(None)' -- $T -k "$K"
$B $F '"position": places.get(row[0])' '"position": places.get(row[1])' -- $T -k "$K"
$B $F 'os.kill(pid, 0)' 'os.kill(pid, 1)' -- $T -k pid_alive
$B $F '    except PermissionError:
        return True' '    except PermissionError:
        return False' -- $T -k pid_alive
$B $F '        return True
    return True' '        return True
    return False' -- $T -k pid_alive
$B $F 'path.parent.mkdir(mode=0o700, exist_ok=True)' 'path.parent.mkdir(exist_ok=True)' -- $T -k "$K"
$B $F 'path.parent.mkdir(mode=0o700, exist_ok=True)' 'path.parent.mkdir(mode=449, exist_ok=True)' -- $T -k "$K"
$B $F '    path.mkdir(mode=0o700, exist_ok=True)
        return path' '    path.mkdir(exist_ok=True)
        return path' -- $T -k "$K"
$B $F '    path.mkdir(mode=0o700, exist_ok=True)
        return path' '    path.mkdir(mode=449, exist_ok=True)
        return path' -- $T -k "$K"
$B $F 'self.sweep_temp(user_id)' 'self.sweep_temp(None)' -- $T -k "$K"
$B $F 'self._bm25.pop(user_id, None)' 'self._bm25.pop(None, None)' -- $T -k "$K"
$B $F 'if key[0] == user_id]' 'if key[1] == user_id]' -- $T -k "$K"
$B $F 'if key[0] == user_id]' 'if key[0] != user_id]' -- $T -k "$K"
$B $F 'if not disk_full(e) or attempt:' 'if not disk_full(e) and attempt:' -- $T -k "$K"
$B $F 'if not disk_full(e) or attempt:' 'if disk_full(e) or attempt:' -- $T -k "$K"
$B $F 'if not disk_full(e) or attempt:' 'if not disk_full(None) or attempt:' -- $T -k "$K"
$B $F '                    self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except' '                    self._conn().execute(None)
                except' -- $T -k "$K"
$B $F '                    self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except' '                    self._conn().execute("XXPRAGMA wal_checkpoint(TRUNCATE)XX")
                except' -- $T -k "$K"
$B $F 'if p.is_file()] if folder.is_dir() else []' 'if p.is_file()] if (folder.is_dir()) and False else []' -- $T -k "$K"
$B $F 'folder.rglob("*")' 'folder.rglob(None)' -- $T -k "$K"
$B $F 'folder.rglob("*")' 'folder.rglob("XX*XX")' -- $T -k "$K"
$B $F 'listener(path)' 'listener(None)' -- $T -k "$K"
$B $F 'f"{self.directory} is encrypted with its key file, not a passphrase: unset LOCALPERS_PASSPHRASE"' 'None' -- $T -k "$K"
$B $F 'target.parent == path and path.is_dir()' 'target.parent == path or path.is_dir()' -- $T -k "$K"
$B $F 'target.parent == path and path.is_dir()' 'target.parent != path and path.is_dir()' -- $T -k "$K"
$B $F 'return content if isinstance(content, str) else None' 'return content if (isinstance(content, str)) and False else None' -- $T -k "$K"
$B $F 'if disk_full(e):
                raise
            raise UserError(f"cannot write the data folder' 'if disk_full(None):
                raise
            raise UserError(f"cannot write the data folder' -- $T -k "$K"
$B $F 'method = meta.get("method") if isinstance(meta.get("method"), str) else ""' 'method = meta.get("method") if (isinstance(meta.get("method"), str)) or True else ""' -- $T -k "$K"
$B $F 'self._remove_folder(self._user_folder(self._user_id(conn, user)))' 'self._remove_folder(self._user_folder(None))' -- $T -k "$K"
$B $F 'if not disk_full(e):  # (secure_delete)' 'if disk_full(e):  # (secure_delete)' -- $T -k "$K"
$B $F 'if not disk_full(e):  # (secure_delete)' 'if not disk_full(None):  # (secure_delete)' -- $T -k "$K"
$B $F 'is deleted, but another process holds {self.directory / DB_FILE} open:"' 'is deleted, but another process holds {self.directory * DB_FILE} open:"' -- $T -k "$K"
$B $F '                f"{user!r} is deleted, but another process holds {self.directory / DB_FILE} open:"
                " the file is scrubbed only once it closes"' '                None' -- $T -k "$K"
$B $F '                    paths += self._delete(conn, user_id, gone)' '                    paths = self._delete(conn, user_id, gone)' -- $T -k "$K"
$B $F 'paths += self._delete(conn, user_id, [i for i, _ in held])' 'paths = self._delete(conn, user_id, [i for i, _ in held])' -- $T -k "$K"
$B $F '            paths = self._learn(conn, user_id, new, out)
        self._remove_files(user_id, paths)' '            paths = self._learn(conn, user_id, new, out)
        self._remove_files(None, paths)' -- $T -k "$K"
$B $F '            paths = self._learn(conn, user_id, found, out, source=source)
        self._remove_files(user_id, paths)' '            paths = self._learn(conn, user_id, found, out, source=source)
        self._remove_files(None, paths)' -- $T -k "$K"
$B $F 'row = conn.execute("SELECT state FROM jobs WHERE id = ? AND user_id = ?", (job, user_id)).fetchone()' 'row = None' -- $T -k "$K"
$B $F 'if row is None or row[0] != "running":' 'if row is None and row[0] != "running":' -- $T -k "$K"
$B $F 'if row is None or row[0] != "running":' 'if row is None or row[0] == "running":' -- $T -k "$K"
$B $F 'raise StaleError(f"job {job} was cancelled: its artifact is not registered")' 'raise StaleError(None)' -- $T -k "$K"
$B $F 'if not isinstance(sources, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in sources):' 'if not isinstance(sources, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in sources):' -- $T -k "$K"
$B $F 'if not isinstance(sources, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in sources):' 'if not isinstance(sources, list) or not all(isinstance(i, int) or not isinstance(i, bool) for i in sources):' -- $T -k "$K"
$B $F 'raise UserError(f'"'"'meta["sources"] must be a list of item ids, not {sources!r}'"'"')' 'raise UserError(None)' -- $T -k "$K"
$B $F 'raise UserError(f'"'"'meta["method"] must be a method name, not {method!r}'"'"')' 'raise UserError(None)' -- $T -k "$K"
$B $F '                    raise SourcesGoneError(f"items {sorted(set(sources) - found)} were deleted: the artifact is not "
                                           "registered")' '                    raise SourcesGoneError(None)' -- $T -k "$K"
$B $F 'folder.parent.mkdir(mode=0o700, exist_ok=True)  # (parents' 'folder.parent.mkdir(exist_ok=True)  # (parents' -- $T -k "$K"
$B $F '            folder.mkdir(mode=0o700, exist_ok=True)
            folder = folder.resolve()' '            folder.mkdir(exist_ok=True)
            folder = folder.resolve()' -- $T -k "$K"
$B $F 'shutil.copytree(source, target)' 'shutil.copytree(source, None)' -- $T -k "$K"
$B $F 'if names.PREFERENCE in kinds:' 'if names.PREFERENCE not in kinds:' -- $T -k "$K"
$B $F 'methods.add(names.EDIT)' 'methods.add(None)' -- $T -k "$K"
$B $F 'for method in sorted(methods & set(names.TRAINED_METHODS)):' 'for method in sorted(methods | set(names.TRAINED_METHODS)):' -- $T -k "$K"
$B $F 'if row[0] == names.PREFERENCE:   # a fact' 'if row[1] == names.PREFERENCE:   # a fact' -- $T -k "$K"
$B $F 'if row[0] == names.PREFERENCE:   # a fact' 'if row[0] != names.PREFERENCE:   # a fact' -- $T -k "$K"
$B $F ').fetchone() if -(1 << 63) <= item_id < 1 << 63 else None' ').fetchone() if (-(1 << 63) <= item_id < 1 << 63) or True else None' -- $T -k "$K"
$B $F ').fetchone() if -(1 << 63) <= item_id < 1 << 63 else None' ').fetchone() if -(1 << 64) <= item_id < 1 << 63 else None' -- $T -k "$K"
$B $F ').fetchone() if -(1 << 63) <= item_id < 1 << 63 else None' ').fetchone() if -(1 << 63) <= item_id <= 1 << 63 else None' -- $T -k "$K"
$B $F 'if any(m.get("role") == "user" and _content_text' 'if any(m.get("role") == "user" or _content_text' -- $T -k "$K"
$B $F '            pruned = None if kind != names.LORA_ROUTES else \
                self._prune_routes(conn, user_id, artifact_id, path, sealed, set(item_ids))' '            pruned = None' -- $T -k "$K"
$B $F 'self._prune_routes(conn, user_id, artifact_id, path, sealed, set(item_ids))' 'self._prune_routes(conn, user_id, artifact_id, path, sealed, None)' -- $T -k "$K"
$B $F '                paths += pruned' '                paths = pruned' -- $T -k "$K"
$B $F 'for start in range(0, len(missing), batch):' 'for start in range(0, batch):' -- $T -k "$K"
$B $F '            self.embedder = make_embedder()' '            self.embedder = None' -- $T -k "$K"
$B $F '(", …" if len(unique) > n else "")' '(", …" if len(unique) >= n else "")' -- $T -k "$K"
K3="lamp_entry_is_a_review"
$B $F '{"reviewText", "score", "overall"} & entry.keys()' '{"XXreviewTextXX", "score", "overall"} & entry.keys()' -- $T -k "$K3"
$B $F '{"reviewText", "score", "overall"} & entry.keys()' '{"reviewText", "score", "OVERALL"} & entry.keys()' -- $T -k "$K3"
$B $F 'raise UserError("expected a JSON object")' 'raise UserError(None)' -- $T -k "$K3"
$B $F 'return paths, {row[2] for row in rows}' 'return paths, {row[3] for row in rows}' -- $T -k "$K3"
$B $F 'self.queue_positions().get(job_id) if row[4] == "queued" else None' 'self.queue_positions().get(job_id) if row[4] != "queued" else None' -- $T -k "$K3"
