"""Conformance of the CQL stand-in CLUSTER with the Python driver (scylla-driver): it discovers
every node, agrees on the schema version, and its token map names the same replicas as the
stand-in's own placement (Murmur3, vnodes, SimpleStrategy and NetworkTopologyStrategy); and in
keyspaces created WITH tablets, it learns each tablet from the `tablets-routing-v1` payload of a
write a node outside the tablet served (TABLETS_ROUTING_V1), then routes every write to a replica.

Run by tests/sandbox_process.rs against `vault-sandbox --cql-nodes 3`: VAULT_SCYLLA_NODES names
every node (one port), VAULT_SANDBOX_CONTROL the control port, whose `cql routing` says how many
writes each node served and how many of them it is not a replica of."""

import os
import sys

from cassandra.cluster import Cluster, ExecutionProfile, EXEC_PROFILE_DEFAULT
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy, WhiteListRoundRobinPolicy

from sandbox_control import control

KEYSPACES = {
    "pyc1": ("{'class': 'SimpleStrategy', 'replication_factor': 1}", 1),
    "pyc2": ("{'class': 'NetworkTopologyStrategy', 'datacenter1': 2}", 2),
    # The shorthand, stored expanded to datacenter1 as ScyllaDB stores it: the driver reads the
    # stored map, and would take an unexpanded 'replication_factor' for a datacenter's name.
    "pyc3": ("{'class': 'NetworkTopologyStrategy', 'replication_factor': 2}", 2),
}

# Tablet keyspaces: 8 tablets named, and the stand-in's default (8) when 'initial' is not.
TABLET_KEYSPACES = {
    "pyt1": ("{'class': 'NetworkTopologyStrategy', 'datacenter1': 1} AND tablets = {'enabled': true, 'initial': 8}", 1),
    "pyt2": ("{'class': 'NetworkTopologyStrategy', 'datacenter1': 2} AND tablets = {'enabled': true}", 2),
}
TABLETS = 8


def routing():
    """(writes, non_replica, writes per node) from `cql routing`."""
    fields = dict(w.split("=", 1) for w in control("cql routing").split()[1:])
    return int(fields["writes"]), int(fields["non_replica"]), [int(n) for n in fields["by_node"].split(",")]


def day(i):
    # Days whose low byte is often above 0x7f, in 18-byte compound keys whose Murmur3 tail holds
    # it: the hash's sign quirk has to agree too.
    return -2**31 + i * 7919


def main():
    nodes = [a.rsplit(":", 1) for a in os.environ["VAULT_SCYLLA_NODES"].split(",")]
    addresses = [h for h, _ in nodes]
    port = int(nodes[0][1])
    assert len(nodes) == 3 and all(int(p) == port for _, p in nodes), nodes
    # The default profile routes token-aware; one profile per node pins a request to it.
    profiles = {EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()))}
    for a in addresses:
        profiles[a] = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([a]))
    cluster = Cluster([addresses[0]], port=port, protocol_version=4, compression=False,
                      execution_profiles=profiles, max_schema_agreement_wait=5)
    s = cluster.connect(wait_for_all_pools=True)
    hosts = cluster.metadata.all_hosts()
    assert sorted(h.address for h in hosts) == sorted(addresses), hosts
    assert all(h.datacenter == "datacenter1" and h.rack == "rack1" and h.is_up for h in hosts), hosts

    for ks, (replication, _) in KEYSPACES.items():
        for ddl in (f"CREATE KEYSPACE {ks} WITH replication = {replication}",
                    f"CREATE TABLE {ks}.events (u text, day int, at bigint, v text, PRIMARY KEY ((u, day), at))",
                    f"CREATE TABLE {ks}.plain (k text PRIMARY KEY, v text)"):
            # After DDL the driver polls every node's schema version until they agree.
            assert s.execute(ddl).response_future.is_schema_agreed, f"no schema agreement after {ddl}"

    # Token-aware writes all land on a replica, and on more than one node.
    writes, misplaced, by_node = routing()
    sent = 0
    for ks in KEYSPACES:
        ins = s.prepare(f"INSERT INTO {ks}.events (u, day, at, v) VALUES (?, ?, ?, ?)")
        plain = s.prepare(f"INSERT INTO {ks}.plain (k, v) VALUES (?, ?)")
        for i in range(30):
            s.execute(ins, (f"user-{i:03}", day(i), i, "x"))
            s.execute(plain, (f"k{i}", "x"))
            sent += 2
    after, misplaced_after, by_node_after = routing()
    assert after - writes == sent, (writes, after, sent)
    assert misplaced_after == misplaced, f"token-aware writes on a non-replica: {misplaced_after - misplaced}"
    busy = [b - a for a, b in zip(by_node, by_node_after)]
    assert sum(1 for n in busy if n > 0) > 1, f"writes per node: {busy}"

    # For each key, a write pinned to each node: the stand-in counts it as on a non-replica exactly
    # when the driver's token map says that node is not a replica.
    checked = 0
    for ks, (_, rf) in KEYSPACES.items():
        ins = s.prepare(f"INSERT INTO {ks}.events (u, day, at, v) VALUES (?, ?, ?, ?)")
        plain = s.prepare(f"INSERT INTO {ks}.plain (k, v) VALUES (?, ?)")
        for i in range(6):
            for bound in (ins.bind((f"key-{i:03}", day(i), 100 + i, "p")), plain.bind((f"key-{i}", "p"))):
                replicas = {h.address for h in cluster.metadata.get_replicas(ks, bound.routing_key)}
                assert len(replicas) == rf, (ks, replicas)
                for n, a in enumerate(addresses):
                    w0, m0, by0 = routing()
                    s.execute(bound, execution_profile=a)
                    w1, m1, by1 = routing()
                    assert w1 == w0 + 1 and by1[n] == by0[n] + 1, f"served by {a}: {by0} -> {by1}"
                    expected = 0 if a in replicas else 1
                    assert m1 - m0 == expected, f"{ks} key {i} on {a}: replicas {sorted(replicas)}, counted {m1 - m0}"
                    checked += 1
        # One store: what one node took, every node reads.
        for a in addresses:
            row = s.execute(f"SELECT v FROM {ks}.plain WHERE k = 'key-0'", execution_profile=a).one()
            assert row is not None and row.v == "p", (a, row)
    learned = check_tablets(cluster, s, addresses)
    cluster.shutdown()
    print(f"python driver cluster conformance: ok; {sent} token-aware writes, {checked} pinned writes checked, "
          f"{learned} tablets learned")


def check_tablets(cluster, s, addresses):
    """Tablet keyspaces: the driver learns every tablet from the payloads (token ranges that tile
    the ring, replicas where the stand-in counts writes as on a replica), then routes by them."""
    conn = cluster.control_connection._connection
    assert conn.features.tablets_routing_v1 and not conn.features.tablets_routing_v2, "TABLETS_ROUTING_V1 negotiated"
    tablets = cluster.metadata._tablets
    host_ids = {h.address: h.host_id for h in cluster.metadata.all_hosts()}
    learned = 0
    for ks, (options, rf) in TABLET_KEYSPACES.items():
        for ddl in (f"CREATE KEYSPACE {ks} WITH replication = {options}",
                    f"CREATE TABLE {ks}.events (u text, day int, at bigint, v text, PRIMARY KEY ((u, day), at))"):
            assert s.execute(ddl).response_future.is_schema_agreed, f"no schema agreement after {ddl}"
        ins = s.prepare(f"INSERT INTO {ks}.events (u, day, at, v) VALUES (?, ?, ?, ?)")
        # The driver knows a table has tablets once a payload taught it one.
        assert not tablets.table_has_tablets(ks, "events"), f"{ks}: tablets before any write"

        # Warm-up, token-aware: until a tablet is known the driver routes by its vnode token map,
        # and a write the stand-in serves outside the partition's tablet answers with the tablet.
        writes, misplaced, _ = routing()
        bound = [ins.bind((f"warm-{i:03}", day(i), i, "w")) for i in range(200)]
        for b in bound:
            s.execute(b)
        after, misplaced_after, _ = routing()
        assert after - writes == len(bound), (writes, after)
        assert misplaced_after > misplaced, f"{ks}: no warm-up write missed its tablet: nothing to learn from"
        known = tablets._tablets.get((ks, "events"), [])
        assert len(known) == TABLETS, f"{ks}: learned {known}"
        # (first, last]: each tablet starts where the previous ends, from the minimum to the
        # maximum token, in equal spans.
        span = 2**64 // TABLETS
        for i, t in enumerate(known):
            assert t.first_token == (-2**63 if i == 0 else known[i - 1].last_token), (ks, i, known)
            assert t.last_token == -2**63 + (i + 1) * span - 1, (ks, i, t)
            assert len({h for h, _ in t.replicas}) == rf and all(sh == 0 for _, sh in t.replicas), (ks, t)
        learned += len(known)

        # Every learned tablet's replicas are where the stand-in counts a pinned write as placed.
        token_of = cluster.metadata.token_map.token_class.from_key
        for t in known:
            b = next(b for b in bound if tablets.get_tablet_for_key(ks, "events", token_of(b.routing_key)) is t)
            replicas = {h for h, _ in t.replicas}
            for n, a in enumerate(addresses):
                _, m0, _ = routing()
                s.execute(b, execution_profile=a)
                _, m1, _ = routing()
                expected = 0 if host_ids[a] in replicas else 1
                assert m1 - m0 == expected, f"{ks} tablet {t} on {a}: counted {m1 - m0}"

        # Routed by tablet now: fresh keys, token-aware, all on a replica, on more than one node.
        writes, misplaced, by_node = routing()
        for i in range(60):
            s.execute(ins, (f"fresh-{i:03}", day(i), i, "f"))
        after, misplaced_after, by_node_after = routing()
        assert after - writes == 60, (writes, after)
        assert misplaced_after == misplaced, f"{ks}: tablet-aware writes on a non-replica: {misplaced_after - misplaced}"
        busy = [b - a for a, b in zip(by_node, by_node_after)]
        assert sum(1 for n in busy if n > 0) > 1, f"{ks}: writes per node: {busy}"
    return learned


if __name__ == "__main__":
    sys.exit(main())
