//! The stand-in cluster's token ring: each node's identity (address, host id, vnode tokens) and
//! which nodes replicate a partition of a vnode keyspace, placed as Cassandra and ScyllaDB place
//! it (vnodes on the Murmur3 range; SimpleStrategy, and NetworkTopologyStrategy in the one
//! datacenter, take the owners of the first distinct nodes walking the ring clockwise from the
//! partition's token). This module is the only place that knows how vnode keyspaces are placed
//! (`tablets` places tablet keyspaces), and the only one that knows how a keyspace's replication
//! map is stored ([`Replication::stored`]), which every placement reads; the nodes'
//! `system.local` and `system.peers` rows are rendered from it.

use std::net::Ipv4Addr;

use uuid::Uuid;

/// The datacenter and rack every node of the stand-in reports.
pub const DATACENTER: &str = "datacenter1";
pub const RACK: &str = "rack1";

/// Vnode tokens each node of a cluster of several owns.
pub const VNODES_PER_NODE: usize = 16;

/// One node of the ring.
#[derive(Debug, Clone)]
pub struct RingNode {
    pub address: Ipv4Addr,
    pub host_id: Uuid,
    /// Its vnode tokens, ascending.
    pub tokens: Vec<i64>,
}

/// The nodes and their tokens.
#[derive(Debug, Clone)]
pub struct Ring {
    nodes: Vec<RingNode>,
    /// Every vnode token with the index of its node, ascending by token.
    vnodes: Vec<(i64, usize)>,
}

/// How a keyspace places its partitions, read from its replication options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// Copies on the first `n` distinct nodes from the partition's token (SimpleStrategy; and
    /// NetworkTopologyStrategy, whose factor for `datacenter1` is the only one that counts here).
    Factor(usize),
    /// Every node holds the data (LocalStrategy: its own; EverywhereStrategy; and any class the
    /// stand-in does not model, so that it is never counted as misrouted).
    EveryNode,
}

impl Replication {
    /// Reads CREATE KEYSPACE's replication map (`class` and its options).
    pub fn parse(options: &[(String, String)]) -> Replication {
        let get = |key: &str| {
            options
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let factor = |key: &str| get(key).and_then(|v| v.trim().parse::<usize>().ok());
        let class = get("class").unwrap_or_default();
        match class.rsplit('.').next().unwrap_or_default() {
            "SimpleStrategy" => Replication::Factor(factor("replication_factor").unwrap_or(1)),
            // Read from the stored map, where `replication_factor` is already expanded.
            "NetworkTopologyStrategy" => Replication::Factor(factor(DATACENTER).unwrap_or(0)),
            _ => Replication::EveryNode,
        }
    }

    /// CREATE KEYSPACE's replication map as ScyllaDB stores it (`system_schema.keyspaces`),
    /// which is what drivers and [`Replication::parse`] read: the class by its qualified name;
    /// for NetworkTopologyStrategy a `replication_factor` expanded to every datacenter of the
    /// cluster (here only [`DATACENTER`]), a datacenter named beside it keeping its own factor;
    /// keys in a `map<text, text>`'s order.
    pub fn stored(given: &[(String, String)]) -> Vec<(String, String)> {
        let mut stored: std::collections::BTreeMap<String, String> =
            given.iter().cloned().collect();
        if let Some(class) = stored.get_mut("class") {
            if !class.contains('.') {
                *class = format!("org.apache.cassandra.locator.{class}");
            }
        }
        let nts = stored.get("class").map(String::as_str)
            == Some("org.apache.cassandra.locator.NetworkTopologyStrategy");
        if nts {
            if let Some(rf) = stored.remove("replication_factor") {
                stored.entry(DATACENTER.to_string()).or_insert(rf);
            }
        }
        stored.into_iter().collect()
    }
}

impl Ring {
    /// A ring over these addresses: one node owns the single token 0 (the stand-in's node as it
    /// always was); several own [`VNODES_PER_NODE`] tokens each, drawn from a fixed seed so that
    /// every run places data alike, and interleaved irregularly as real vnodes are.
    pub fn new(addresses: &[Ipv4Addr]) -> Ring {
        if let [one] = addresses {
            return Ring::with_tokens(vec![(*one, vec![0])]);
        }
        let mut rng = SplitMix64(0x5eed_0000 + addresses.len() as u64);
        let mut taken = std::collections::BTreeSet::new();
        let nodes = addresses
            .iter()
            .map(|a| {
                let mut tokens = Vec::with_capacity(VNODES_PER_NODE);
                while tokens.len() < VNODES_PER_NODE {
                    // The minimum token is no partition's and owned by no node.
                    let t = rng.next() as i64;
                    if t != i64::MIN && taken.insert(t) {
                        tokens.push(t);
                    }
                }
                (*a, tokens)
            })
            .collect();
        Ring::with_tokens(nodes)
    }

    /// A ring with these nodes and tokens (random host ids).
    pub fn with_tokens(nodes: Vec<(Ipv4Addr, Vec<i64>)>) -> Ring {
        let nodes: Vec<RingNode> = nodes
            .into_iter()
            .map(|(address, mut tokens)| {
                tokens.sort_unstable();
                RingNode {
                    address,
                    host_id: Uuid::new_v4(),
                    tokens,
                }
            })
            .collect();
        let mut vnodes: Vec<(i64, usize)> = nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.tokens.iter().map(move |t| (*t, i)))
            .collect();
        vnodes.sort_unstable();
        Ring { nodes, vnodes }
    }

    pub fn nodes(&self) -> &[RingNode] {
        &self.nodes
    }

    /// The nodes that replicate the partition with this token, primary first: the owners of the
    /// first `factor` distinct nodes met walking clockwise from the first vnode token at or
    /// after it, wrapping past the largest token to the smallest.
    pub fn replicas(&self, token: i64, factor: usize) -> Vec<usize> {
        let want = factor.min(self.nodes.len());
        let start = self.vnodes.partition_point(|(t, _)| *t < token);
        let mut out = Vec::with_capacity(want);
        for i in 0..self.vnodes.len() {
            if out.len() == want {
                break;
            }
            let (_, node) = self.vnodes[(start + i) % self.vnodes.len()];
            if !out.contains(&node) {
                out.push(node);
            }
        }
        out
    }

    /// The nodes that hold a copy of the partition with this token, by a vnode keyspace's
    /// replication: every node when it is not placed by token.
    pub fn holders(&self, token: i64, replication: Replication) -> Vec<usize> {
        match replication {
            Replication::EveryNode => (0..self.nodes.len()).collect(),
            Replication::Factor(n) => self.replicas(token, n),
        }
    }
}

/// A small seeded generator (SplitMix64): deterministic tokens without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, last)
    }

    /// Three nodes: A owns -100 and 200, B owns 0, C owns 100. Clockwise: A(-100) B(0) C(100)
    /// A(200), then back to A(-100).
    fn three() -> Ring {
        Ring::with_tokens(vec![
            (ip(1), vec![200, -100]),
            (ip(2), vec![0]),
            (ip(3), vec![100]),
        ])
    }

    #[test]
    fn rf1_is_the_owner_of_the_first_token_at_or_after_the_partition() {
        let r = three();
        assert_eq!(
            r.replicas(-100, 1),
            [0],
            "a token equal to a vnode's: that vnode"
        );
        assert_eq!(r.replicas(-99, 1), [1]);
        assert_eq!(r.replicas(0, 1), [1]);
        assert_eq!(r.replicas(50, 1), [2]);
        assert_eq!(r.replicas(150, 1), [0]);
    }

    #[test]
    fn past_the_largest_token_the_ring_wraps_to_the_smallest() {
        let r = three();
        assert_eq!(r.replicas(201, 1), [0], "wraps to A(-100)");
        assert_eq!(r.replicas(i64::MAX, 2), [0, 1]);
        assert_eq!(r.replicas(i64::MIN + 1, 2), [0, 1]);
    }

    #[test]
    fn rf2_takes_distinct_nodes_skipping_further_vnodes_of_one_already_taken() {
        let r = three();
        assert_eq!(r.replicas(-50, 2), [1, 2]);
        assert_eq!(r.replicas(50, 2), [2, 0]);
        // From A(200) the walk wraps to A(-100), A again, so B is the second replica.
        assert_eq!(r.replicas(150, 2), [0, 1]);
        assert_eq!(r.replicas(150, 3), [0, 1, 2]);
        assert_eq!(r.replicas(150, 5), [0, 1, 2], "at most every node");
        assert_eq!(r.holders(150, Replication::Factor(2)), [0, 1]);
        assert_eq!(r.holders(150, Replication::EveryNode), [0, 1, 2]);
    }

    #[test]
    fn replication_is_read_from_the_keyspace_options() {
        let opts = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let simple = opts(&[("class", "SimpleStrategy"), ("replication_factor", "2")]);
        assert_eq!(Replication::parse(&simple), Replication::Factor(2));
        let full = opts(&[
            ("class", "org.apache.cassandra.locator.SimpleStrategy"),
            ("replication_factor", "3"),
        ]);
        assert_eq!(Replication::parse(&full), Replication::Factor(3));
        let nts = opts(&[("class", "NetworkTopologyStrategy"), ("datacenter1", "2")]);
        assert_eq!(Replication::parse(&nts), Replication::Factor(2));
        let elsewhere = opts(&[("class", "NetworkTopologyStrategy"), ("dc2", "3")]);
        assert_eq!(Replication::parse(&elsewhere), Replication::Factor(0));
        let local = opts(&[("class", "LocalStrategy")]);
        assert_eq!(Replication::parse(&local), Replication::EveryNode);
    }

    /// NetworkTopologyStrategy's `replication_factor` is stored as a factor for the one
    /// datacenter, which is what placement reads; a datacenter named beside it wins.
    #[test]
    fn the_stored_map_expands_replication_factor_to_the_datacenter() {
        let opts = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let nts = "org.apache.cassandra.locator.NetworkTopologyStrategy";
        let short = Replication::stored(&opts(&[
            ("replication_factor", "3"),
            ("class", "NetworkTopologyStrategy"),
        ]));
        assert_eq!(short, opts(&[("class", nts), ("datacenter1", "3")]));
        assert_eq!(Replication::parse(&short), Replication::Factor(3));
        let beside = Replication::stored(&opts(&[
            ("class", nts),
            ("replication_factor", "3"),
            ("datacenter1", "1"),
            ("dc2", "2"),
        ]));
        let want = opts(&[("class", nts), ("datacenter1", "1"), ("dc2", "2")]);
        assert_eq!(beside, want, "datacenter1 named beside it wins");
        let simple = Replication::stored(&opts(&[
            ("class", "SimpleStrategy"),
            ("replication_factor", "2"),
        ]));
        let want = opts(&[
            ("class", "org.apache.cassandra.locator.SimpleStrategy"),
            ("replication_factor", "2"),
        ]);
        assert_eq!(simple, want, "SimpleStrategy keeps its factor");
    }

    #[test]
    fn a_cluster_spreads_distinct_vnodes_the_same_way_every_time() {
        let addrs = [ip(1), ip(2), ip(3)];
        let (a, b) = (Ring::new(&addrs), Ring::new(&addrs));
        assert_eq!(a.vnodes, b.vnodes, "deterministic");
        assert_eq!(a.vnodes.len(), 3 * VNODES_PER_NODE, "no token twice");
        for n in a.nodes() {
            assert_eq!(n.tokens.len(), VNODES_PER_NODE);
        }
        // Every node is some partition's primary replica.
        let mut primaries = std::collections::BTreeSet::new();
        for k in 0..1000i64 {
            let token = crate::cql::murmur3::token(&k.to_be_bytes());
            primaries.insert(a.replicas(token, 1)[0]);
        }
        assert_eq!(primaries.len(), 3);
        assert_eq!(
            Ring::new(&[ip(1)]).nodes()[0].tokens,
            [0],
            "one node: token 0"
        );
    }
}
