"""Prints every cell vault wrote in a keyspace's user_activity, with its write timestamp, through
the Python driver (scylla-driver), a client the project did not write. Used by tests/it/store.rs
to compare what two consumer groups reading the same topic left in the table.

Usage: cells.py HOST:PORT KEYSPACE"""

import sys

from cassandra.cluster import Cluster


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    keyspace = sys.argv[2]
    cluster = Cluster([host], port=int(port), protocol_version=4, compression=False)
    s = cluster.connect()
    rows = s.execute(
        f"SELECT user_id, day, occurred_at, event_id, attributes, payload, source_offset, kafka_timestamp, "
        f"WRITETIME(attributes), WRITETIME(payload), WRITETIME(kafka_timestamp) FROM {keyspace}.user_activity"
    )
    for r in sorted(rows, key=lambda r: (r.user_id, str(r.day), r.occurred_at, r.event_id)):
        print("|".join(str(v) for v in r))
    cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
