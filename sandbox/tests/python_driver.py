"""Conformance of the CQL stand-in node with the Python driver (scylla-driver, the base of cqlsh).

Run by tests/sandbox_process.rs against a running `vault-sandbox`: VAULT_SCYLLA_NODES names the
node, VAULT_SANDBOX_CONTROL its control port (used to inject faults)."""

import datetime
import os
import time
import sys
import uuid

from cassandra import OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
from cassandra.cluster import Cluster, ExecutionProfile, EXEC_PROFILE_DEFAULT
from cassandra.policies import FallthroughRetryPolicy, RoundRobinPolicy
from cassandra.protocol import OverloadedErrorMessage, ServerError, SyntaxException
from cassandra.query import BatchStatement, BatchType, SimpleStatement

from sandbox_control import control


def expect(exc_type, fn):
    try:
        fn()
    except exc_type:
        return
    except Exception as e:  # noqa: BLE001 - report what came instead
        raise AssertionError(f"expected {exc_type.__name__}, got {type(e).__name__}: {e}")
    raise AssertionError(f"expected {exc_type.__name__}, got success")


def main():
    host, port = os.environ["VAULT_SCYLLA_NODES"].split(",")[0].rsplit(":", 1)
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), retry_policy=FallthroughRetryPolicy())
    cluster = Cluster([host], port=int(port), protocol_version=4, compression=False,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    s = cluster.connect()
    s.execute("CREATE KEYSPACE IF NOT EXISTS py WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}")
    s.execute("CREATE TABLE IF NOT EXISTS py.events (u text, day date, at timestamp, id uuid, attrs map<text, text>, "
              "PRIMARY KEY ((u, day), at, id)) WITH CLUSTERING ORDER BY (at DESC, id ASC)")
    cluster.refresh_schema_metadata()
    assert "events" in cluster.metadata.keyspaces["py"].tables, "schema metadata from system_schema"
    local = s.execute("SELECT * FROM system.local WHERE key = 'local'").one()
    assert local.release_version and local.partitioner.endswith("Murmur3Partitioner")

    ins = s.prepare("INSERT INTO py.events (u, day, at, id, attrs) VALUES (?, ?, ?, ?, ?)")
    day = datetime.date(2025, 11, 24)
    base = datetime.datetime(2025, 11, 24, 10, 0, 0)
    for i in range(23):
        s.execute(ins, ("a", day, base + datetime.timedelta(seconds=i), uuid.UUID(int=i), {"i": str(i)}))
    rows = list(s.execute(SimpleStatement("SELECT at, attrs FROM py.events WHERE u = 'a' AND day = '2025-11-24'", fetch_size=5)))
    assert len(rows) == 23, len(rows)
    assert rows[0].attrs == {"i": "22"} and rows[-1].attrs == {"i": "0"}, "newest first"
    rows = list(s.execute("SELECT at FROM py.events WHERE u = 'a' AND day = '2025-11-24' AND at >= '2025-11-24 10:00:20+0000' ORDER BY at ASC LIMIT 2"))
    assert [r.at.second for r in rows] == [20, 21], rows
    assert s.execute("SELECT COUNT(*) FROM py.events WHERE u = 'a' AND day = '2025-11-24'").one()[0] == 23

    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    for i in range(5):
        batch.add(ins, ("b", day, base, uuid.UUID(int=100 + i), {}))
    s.execute(batch)
    assert s.execute("SELECT COUNT(*) FROM py.events WHERE u = 'b' AND day = '2025-11-24'").one()[0] == 5

    # Write timestamps: last write wins per cell by USING TIMESTAMP, whatever the arrival order;
    # at an equal timestamp the greater value wins; WRITETIME() reads it back.
    s.execute("CREATE TABLE IF NOT EXISTS py.versions (k text PRIMARY KEY, v text)")
    versioned = s.prepare("INSERT INTO py.versions (k, v) VALUES (?, ?) USING TIMESTAMP ?")
    read = "SELECT v, WRITETIME(v) FROM py.versions WHERE k = 'r'"
    s.execute(versioned, ("r", "newer", 2000))
    s.execute(versioned, ("r", "older", 1000))
    assert tuple(s.execute(read).one()) == ("newer", 2000), "an older write arriving later loses"
    s.execute(versioned, ("r", "a-tie", 2000))
    assert s.execute(read).one()[0] == "newer", "a tie keeps the greater value"
    s.execute(versioned, ("r", "z-tie", 2000))
    assert s.execute(read).one()[0] == "z-tie", "a tie takes the greater value"
    s.execute("INSERT INTO py.versions (k, v) VALUES ('r', 'latest') USING TIMESTAMP 3000")
    assert tuple(s.execute(read).one()) == ("latest", 3000)
    # A partition tombstone shadows every write at or before its timestamp, whenever it arrives.
    s.execute("CREATE TABLE IF NOT EXISTS py.tombs (p text, c int, v text, PRIMARY KEY (p, c))")
    put = s.prepare("INSERT INTO py.tombs (p, c, v) VALUES ('a', ?, 'x') USING TIMESTAMP ?")
    s.execute(put, (1, 10))
    s.execute(put, (2, 30))
    s.execute(s.prepare("DELETE FROM py.tombs USING TIMESTAMP ? WHERE p = ?"), (20, "a"))
    for c, ts in [(3, 19), (4, 20), (5, 21)]:
        s.execute(put, (c, ts))
    live = [r.c for r in s.execute("SELECT c FROM py.tombs WHERE p = 'a'")]
    assert live == [2, 5], live

    # Compaction purges a tombstone once the table's gc_grace_seconds have passed since the
    # delete (tombstone_gc mode 'timeout'); an older write arriving after that is visible again.
    s.execute("CREATE TABLE IF NOT EXISTS py.gc0 (p text, c int, v text, PRIMARY KEY (p, c)) WITH gc_grace_seconds = 0")
    cluster.refresh_schema_metadata()
    tables = cluster.metadata.keyspaces["py"].tables
    assert tables["gc0"].options["gc_grace_seconds"] == 0, tables["gc0"].options
    assert tables["tombs"].options["gc_grace_seconds"] == 864000, "the default: 10 days"
    s.execute("DELETE FROM py.gc0 USING TIMESTAMP 100 WHERE p = 'z'")
    zombie = s.prepare("INSERT INTO py.gc0 (p, c, v) VALUES ('z', 1, 'x') USING TIMESTAMP 50")
    s.execute(zombie)
    assert s.execute("SELECT c FROM py.gc0 WHERE p = 'z'").one() is None, "shadowed by the tombstone"
    answer = control("cql compact")
    assert answer.strip().endswith(": 1 tombstones purged"), "py.tombs' (10 days' grace) is kept: " + answer
    s.execute(zombie)
    assert [r.c for r in s.execute("SELECT c FROM py.gc0 WHERE p = 'z'")] == [1], "the tombstone is gone"
    s.execute(put, (3, 19))
    live = [r.c for r in s.execute("SELECT c FROM py.tombs WHERE p = 'a'")]
    assert live == [2, 5], "py.tombs' tombstone still shadows: %r" % live
    answer = control("cql compact 11d")
    assert answer.strip().endswith(": 1 tombstones purged"), "11 days on, py.tombs' is purged: " + answer
    s.execute(put, (3, 19))
    live = [r.c for r in s.execute("SELECT c FROM py.tombs WHERE p = 'a'")]
    assert live == [2, 3, 5], live

    # USING TTL: TTL() counts down, and an expired cell is gone.
    s.execute(s.prepare("INSERT INTO py.versions (k, v) VALUES (?, ?) USING TIMESTAMP ? AND TTL ?"), ("ttl", "x", 10, 100))
    left = s.execute("SELECT TTL(v) FROM py.versions WHERE k = 'ttl'").one()[0]
    assert 90 <= left <= 100, left
    s.execute("INSERT INTO py.versions (k, v) VALUES ('short', 'x') USING TTL 1")
    # A row whose INSERT expires keeps its key while a cell an UPDATE wrote lives on.
    s.execute("CREATE TABLE IF NOT EXISTS py.cells (k text PRIMARY KEY, a text, b text)")
    s.execute("INSERT INTO py.cells (k, a) VALUES ('m', 'x') USING TTL 1")
    s.execute("UPDATE py.cells SET b = 'kept' WHERE k = 'm'")
    time.sleep(2.1)  # past the TTL: the expiry itself is the behaviour under test
    assert s.execute("SELECT v FROM py.versions WHERE k = 'short'").one() is None
    assert tuple(s.execute("SELECT k, a, b FROM py.cells WHERE k = 'm'").one()) == ("m", None, "kept")

    # A table's default_time_to_live applies to a write that names no TTL; TTL 0 means none.
    s.execute("CREATE TABLE IF NOT EXISTS py.defttl (k text PRIMARY KEY, v text) WITH default_time_to_live = 100")
    s.execute("INSERT INTO py.defttl (k, v) VALUES ('d', 'x')")
    s.execute("INSERT INTO py.defttl (k, v) VALUES ('z', 'x') USING TTL 0")
    assert 90 <= s.execute("SELECT TTL(v) FROM py.defttl WHERE k = 'd'").one()[0] <= 100
    assert s.execute("SELECT TTL(v) FROM py.defttl WHERE k = 'z'").one()[0] is None

    # At an equal timestamp an expiring cell beats one that never expires, and a later expiry
    # an earlier one, before values are compared (Scylla's compare_atomic_cell_for_merge).
    tie = s.prepare("INSERT INTO py.versions (k, v) VALUES ('tie', ?) USING TIMESTAMP 7 AND TTL ?")
    tied = "SELECT v, TTL(v) FROM py.versions WHERE k = 'tie'"
    s.execute("INSERT INTO py.versions (k, v) VALUES ('tie', 'v') USING TIMESTAMP 7")
    s.execute(tie, ("v", 100))
    assert 90 <= s.execute(tied).one()[1] <= 100, "the expiring cell wins"
    s.execute(tie, ("v", 200))
    s.execute(tie, ("z", 50))
    v, left = s.execute(tied).one()
    assert v == "v" and 190 <= left <= 200, (v, left)

    # UPDATE follows the same rules: USING TIMESTAMP decides, whatever the arrival order.
    s.execute("UPDATE py.versions USING TIMESTAMP 5000 SET v = 'updated' WHERE k = 'r'")
    s.execute(s.prepare("UPDATE py.versions USING TIMESTAMP ? SET v = ? WHERE k = ?"), (4000, "stale", "r"))
    assert tuple(s.execute(read).one()) == ("updated", 5000)

    s.execute("INSERT INTO py.versions (k, v) VALUES ('now', 'x')")
    plain = s.execute("SELECT WRITETIME(v) FROM py.versions WHERE k = 'now'").one()[0]
    assert abs(plain - datetime.datetime.now().timestamp() * 1e6) < 600e6, "server clock in microseconds"

    args = ("c", day, base, uuid.UUID(int=1), {})
    control("cql write-timeout 1 match INSERT")
    expect(WriteTimeout, lambda: s.execute(ins, args))
    control("cql overloaded 1 match INSERT")
    expect(OverloadedErrorMessage, lambda: s.execute(ins, args))
    control("cql unavailable 1 match INSERT")
    expect(Unavailable, lambda: s.execute(ins, args))
    control("cql server-error 1 match INSERT")
    expect(ServerError, lambda: s.execute(ins, args))
    control("cql read-timeout 1 match py.events")
    expect(ReadTimeout, lambda: s.execute("SELECT * FROM py.events WHERE u = 'c' AND day = '2025-11-24'"))
    control("cql delay:3s 1 match INSERT")
    expect(OperationTimedOut, lambda: s.execute(ins, args, timeout=0.5))
    expect(SyntaxException, lambda: s.execute("UPDAT py.events SET attrs = {} WHERE u = 'c'"))
    s.execute(ins, args)
    stats = control("cql stats")
    cluster.shutdown()
    print("python driver conformance: ok;", stats.strip())


if __name__ == "__main__":
    sys.exit(main())
