//! Tablets, as ScyllaDB places the tables of a keyspace created `WITH tablets = {'enabled':
//! true}`: each table's token range split evenly into a power of two of tablets, each tablet on
//! its own replica set, and the `tablets-routing-v1` custom payload (protocol extension
//! `TABLETS_ROUTING_V1`) that tells a driver which tablet a token is in and where it lives.
//! This module is the only place that knows tablet boundaries and replicas; `ring` places vnode
//! keyspaces.
//!
//! A keyspace's [`Tablets`] own where its tablets are: placed at creation ([`tablet_for`]), then
//! moved as ScyllaDB's load balancer moves them ([`Tablets::move_tablet`]); every placement
//! (the payload, which writes a node serves as a replica, the cluster's `replicas` and `tablet`)
//! asks [`Tablets::tablet`].
//!
//! Whether a new keyspace gets tablets at all is decided in one place, [`for_new_keyspace`]: by
//! its `tablets` option, else by the cluster's `tablets_by_default` setting (ScyllaDB's
//! `tablets_mode_for_new_keyspaces: enabled`, see [`for_new_keyspace`]).
//!
//! Stand-in choices: a keyspace that names no `'initial'` count gets [`DEFAULT_TABLETS`] per
//! table (ScyllaDB sizes it from the cluster and the table's data); every table of a keyspace
//! has the same tablets, which never split or merge, and a move moves that tablet of every
//! table of the keyspace (ScyllaDB moves one table's tablet); every replica is shard 0.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::cql::frame::Writer;
use crate::cql::ring::Replication;

/// The protocol extension's name in SUPPORTED and STARTUP.
pub const EXTENSION: &str = "TABLETS_ROUTING_V1";

/// The custom payload key of a RESULT that carries a tablet.
pub const PAYLOAD_KEY: &str = "tablets-routing-v1";

/// Tablets per table of a keyspace whose `tablets` option names no `'initial'` count.
pub const DEFAULT_TABLETS: u64 = 8;

/// A keyspace's `tablets` option, when it enables them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TabletsOption {
    /// `'initial'` as given, 0 when not: what `system_schema.scylla_keyspaces.initial_tablets`
    /// holds, as ScyllaDB writes it.
    pub initial: u32,
}

impl TabletsOption {
    /// Reads CREATE KEYSPACE's `tablets` map alone: `None` when it does not enable them (no
    /// map, or `'enabled': false`). Whether the keyspace gets tablets is
    /// [`for_new_keyspace`]'s to say.
    pub fn parse(options: &[(String, String)]) -> Result<Option<TabletsOption>, String> {
        let mut enabled = !options.is_empty();
        let mut initial = 0;
        for (k, v) in options {
            match k.as_str() {
                "enabled" => {
                    enabled = v.parse().map_err(|_| {
                        format!("tablets 'enabled' must be true or false, not '{v}'")
                    })?
                }
                "initial" => {
                    initial = v.parse().map_err(|_| {
                        format!("tablets 'initial' must be a count of tablets, not '{v}'")
                    })?
                }
                other => return Err(format!("unknown tablets option '{other}'")),
            }
        }
        Ok(enabled.then_some(TabletsOption { initial }))
    }

    /// Tablets per table: `'initial'` rounded up to a power of two (ScyllaDB's tablet counts
    /// are powers of two), or [`DEFAULT_TABLETS`].
    pub fn count(self) -> u64 {
        match self.initial {
            0 => DEFAULT_TABLETS,
            n => u64::from(n).next_power_of_two(),
        }
    }
}

/// Whether a keyspace created now with this replication map and `tablets` map (empty when the
/// statement has none) is placed by tablet, and how: the one rule CREATE KEYSPACE follows.
/// `by_default` is the cluster's `tablets_by_default` setting, ScyllaDB's
/// `tablets_mode_for_new_keyspaces` (`enabled` when set, `disabled` when not).
///
/// - A `tablets` map that enables them (`'enabled': true`, or an `'initial'` count) gives
///   tablets, with any setting; SimpleStrategy with one is refused (tablets are placed per
///   datacenter).
/// - `'enabled': false` gives vnodes, with any setting.
/// - No `tablets` map (or an empty one) gives vnodes, unless `by_default` is set and the class
///   is NetworkTopologyStrategy: then tablets, their count the server's choice (`initial` 0,
///   so [`DEFAULT_TABLETS`] here), as ScyllaDB writes `initial_tablets` 0 for it. Any other
///   class (SimpleStrategy, LocalStrategy, ...) keeps vnodes, as ScyllaDB 6.x does; newer
///   releases (2025.x) refuse SimpleStrategy in a cluster that gives tablets by default
///   instead, which the stand-in does not model.
pub fn for_new_keyspace(
    replication: &[(String, String)],
    tablets: &[(String, String)],
    by_default: bool,
) -> Result<Option<TabletsOption>, String> {
    let class = replication
        .iter()
        .find(|(k, _)| k == "class")
        .and_then(|(_, v)| v.rsplit('.').next())
        .unwrap_or_default();
    match TabletsOption::parse(tablets)? {
        Some(_) if class == "SimpleStrategy" => {
            Err("SimpleStrategy does not support tablets: use NetworkTopologyStrategy".into())
        }
        Some(option) => Ok(Some(option)),
        None if tablets.is_empty() && by_default && class == "NetworkTopologyStrategy" => {
            Ok(Some(TabletsOption { initial: 0 }))
        }
        None => Ok(None),
    }
}

/// One tablet: the tokens in `(first, last]` and the nodes that hold them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablet {
    /// Exclusive, as the payload carries it; `i64::MIN` for the first tablet (no partition has
    /// that token).
    pub first: i64,
    pub last: i64,
    /// Node indexes, in the order the payload lists them.
    pub replicas: Vec<usize>,
}

/// The tablet holding `token` among `count` (a power of two) on a cluster of `nodes`: tablet
/// `i` ends at `i64::MIN + (i + 1) * 2^64 / count - 1` and is on nodes `i, i + 1, ...` (modulo
/// `nodes`), as many as the keyspace's replication factor: spread over the cluster, and unlike
/// the vnode ring's placement of the same token.
pub fn tablet_for(token: i64, count: u64, replication: Replication, nodes: usize) -> Tablet {
    debug_assert!(count.is_power_of_two(), "{count} tablets");
    let span = (1i128 << 64) / i128::from(count);
    let offset = i128::from(token) - i128::from(i64::MIN);
    let index = offset / span;
    let end = |i: i128| (i128::from(i64::MIN) + i * span - 1) as i64;
    let factor = match replication {
        Replication::Factor(n) => n.min(nodes),
        Replication::EveryNode => nodes,
    };
    Tablet {
        first: if index == 0 { i64::MIN } else { end(index) },
        last: end(index + 1),
        replicas: (0..factor).map(|k| (index as usize + k) % nodes).collect(),
    }
}

/// A tablet keyspace's tablets: how many per table, and which moved off the replicas
/// [`tablet_for`] placed them on, to where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablets {
    option: TabletsOption,
    /// The replicas of each moved tablet, by the tablet's last token.
    moved: BTreeMap<i64, Vec<usize>>,
}

impl Tablets {
    /// The tablets of a keyspace just created with this option: none moved.
    pub fn new(option: TabletsOption) -> Tablets {
        Tablets {
            option,
            moved: BTreeMap::new(),
        }
    }

    pub fn option(&self) -> TabletsOption {
        self.option
    }

    /// The tablet holding `token` (see [`tablet_for`]), on the replicas of its last move if it
    /// moved.
    pub fn tablet(&self, token: i64, replication: Replication, nodes: usize) -> Tablet {
        let mut tablet = tablet_for(token, self.option.count(), replication, nodes);
        if let Some(replicas) = self.moved.get(&tablet.last) {
            tablet.replicas.clone_from(replicas);
        }
        tablet
    }

    /// Moves the tablet holding `token` to the nodes `to` (node indexes, primary first, as the
    /// payload will list them): distinct nodes of the cluster, as many as the tablet has
    /// replicas. Returns the tablet after the move; refuses a bad `to` and moves nothing.
    pub fn move_tablet(
        &mut self,
        token: i64,
        to: Vec<usize>,
        replication: Replication,
        nodes: usize,
    ) -> Result<Tablet, String> {
        let placed = tablet_for(token, self.option.count(), replication, nodes);
        if to.len() != placed.replicas.len() {
            return Err(format!(
                "a tablet has {} replicas here, not {}: name as many nodes",
                placed.replicas.len(),
                to.len()
            ));
        }
        if let Some(n) = to.iter().find(|n| **n >= nodes) {
            return Err(format!(
                "no node {n}: the cluster's nodes are 0 to {}",
                nodes - 1
            ));
        }
        if let Some((i, n)) = to.iter().enumerate().find(|(i, n)| to[..*i].contains(n)) {
            return Err(format!(
                "node {n} named twice (at {i}): replicas are distinct"
            ));
        }
        if to == placed.replicas {
            self.moved.remove(&placed.last);
        } else {
            self.moved.insert(placed.last, to.clone());
        }
        Ok(Tablet {
            replicas: to,
            ..placed
        })
    }
}

/// The `tablets-routing-v1` value: the CQL tuple `(bigint first, bigint last, list<tuple<uuid,
/// int>> replicas)`, each element as `[int length][bytes]`, a replica as (host id, shard 0).
pub fn payload(tablet: &Tablet, host_ids: &[Uuid]) -> Vec<u8> {
    let mut replicas = Vec::new();
    replicas.int(tablet.replicas.len() as i32);
    for &node in &tablet.replicas {
        let mut replica = Vec::new();
        replica.bytes(Some(host_ids[node].as_bytes()));
        replica.bytes(Some(&0i32.to_be_bytes()));
        replicas.bytes(Some(&replica));
    }
    let mut out = Vec::new();
    out.bytes(Some(&tablet.first.to_be_bytes()));
    out.bytes(Some(&tablet.last.to_be_bytes()));
    out.bytes(Some(&replicas));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cql::frame::Reader;

    /// The first token of tablet `i` of `count`.
    fn first_token_of(i: u64, count: u64) -> i64 {
        let span = (1i128 << 64) / i128::from(count);
        (i128::from(i64::MIN) + 1 + i128::from(i) * span) as i64
    }

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The rule for a new keyspace, with the setting off and on: an explicit option decides
    /// alone (SimpleStrategy refused with tablets); no option gives tablets only with the
    /// setting and only to NetworkTopologyStrategy.
    #[test]
    fn a_new_keyspace_gets_tablets_by_its_option_else_by_the_setting_for_nts_only() {
        let nts = opts(&[("class", "NetworkTopologyStrategy"), ("datacenter1", "1")]);
        let qualified = opts(&[(
            "class",
            "org.apache.cassandra.locator.NetworkTopologyStrategy",
        )]);
        let simple = opts(&[("class", "SimpleStrategy"), ("replication_factor", "1")]);
        let local = opts(&[("class", "LocalStrategy")]);
        let auto = TabletsOption { initial: 0 };
        let four = TabletsOption { initial: 4 };
        for by_default in [false, true] {
            let rule = |replication: &[(String, String)], pairs: &[(&str, &str)]| {
                for_new_keyspace(replication, &opts(pairs), by_default)
            };
            let case = format!("by default: {by_default}");
            // No option: the setting, for NetworkTopologyStrategy only.
            let default = by_default.then_some(auto);
            assert_eq!(rule(&nts, &[]), Ok(default), "{case}");
            assert_eq!(rule(&qualified, &[]), Ok(default), "{case}");
            assert_eq!(rule(&simple, &[]), Ok(None), "{case}: SimpleStrategy");
            assert_eq!(rule(&local, &[]), Ok(None), "{case}: LocalStrategy");
            // An explicit option, whatever the setting.
            assert_eq!(rule(&nts, &[("enabled", "false")]), Ok(None), "{case}");
            assert_eq!(rule(&simple, &[("enabled", "false")]), Ok(None), "{case}");
            assert_eq!(rule(&nts, &[("enabled", "true")]), Ok(Some(auto)), "{case}");
            let explicit = rule(&nts, &[("enabled", "true"), ("initial", "4")]);
            assert_eq!(explicit, Ok(Some(four)), "{case}");
            assert_eq!(rule(&nts, &[("initial", "4")]), Ok(Some(four)), "{case}");
            for refused in [&[("enabled", "true")][..], &[("initial", "4")]] {
                let got = rule(&simple, refused);
                assert!(got.is_err(), "{case}: SimpleStrategy {refused:?}: {got:?}");
            }
            assert!(rule(&nts, &[("enabled", "maybe")]).is_err(), "{case}");
        }
    }

    #[test]
    fn the_tablets_option_enables_them_with_a_count_rounded_to_a_power_of_two() {
        let parse = |pairs| TabletsOption::parse(&opts(pairs));
        assert_eq!(parse(&[]), Ok(None), "no option: vnodes");
        assert_eq!(parse(&[("enabled", "false")]), Ok(None));
        let auto = parse(&[("enabled", "true")]).unwrap().unwrap();
        assert_eq!((auto.initial, auto.count()), (0, DEFAULT_TABLETS));
        let given = parse(&[("enabled", "true"), ("initial", "8")]).unwrap();
        assert_eq!(given.map(|t| (t.initial, t.count())), Some((8, 8)));
        let odd = parse(&[("initial", "5")]).unwrap().unwrap();
        assert_eq!((odd.initial, odd.count()), (5, 8));
        assert!(parse(&[("enabled", "yes")]).is_err());
        assert!(parse(&[("initial", "-1")]).is_err());
        assert!(parse(&[("enabled", "true"), ("splits", "2")]).is_err());
    }

    #[test]
    fn tablets_split_the_token_range_evenly_and_end_at_the_largest_token() {
        let one = |token| tablet_for(token, 4, Replication::Factor(1), 3);
        let quarter = 1i64 << 62;
        assert_eq!(
            (one(i64::MIN + 1).first, one(i64::MIN + 1).last),
            (i64::MIN, -quarter - 1)
        );
        assert_eq!(one(-quarter - 1), one(i64::MIN + 1), "the last token is in");
        assert_eq!(
            (one(-quarter).first, one(-quarter).last),
            (-quarter - 1, -1)
        );
        assert_eq!((one(0).first, one(0).last), (-1, quarter - 1));
        assert_eq!(
            (one(i64::MAX).first, one(i64::MAX).last),
            (i64::MAX - quarter, i64::MAX)
        );
        let whole = tablet_for(7, 1, Replication::Factor(1), 3);
        assert_eq!((whole.first, whole.last), (i64::MIN, i64::MAX));
        // Every token is in the tablet whose range holds it, tablets in order.
        let mut last = i64::MIN;
        for i in 0..64u64 {
            let t = tablet_for(first_token_of(i, 64), 64, Replication::Factor(1), 3);
            assert_eq!(t.first, last, "tablet {i} starts where the previous ends");
            last = t.last;
        }
        assert_eq!(last, i64::MAX);
    }

    #[test]
    fn replicas_are_distinct_consecutive_nodes_from_the_tablet_index() {
        let at = |i, replication, nodes| {
            tablet_for(first_token_of(i, 8), 8, replication, nodes).replicas
        };
        assert_eq!(at(0, Replication::Factor(1), 3), [0]);
        assert_eq!(at(4, Replication::Factor(1), 3), [1]);
        assert_eq!(at(2, Replication::Factor(2), 3), [2, 0]);
        assert_eq!(
            at(7, Replication::Factor(5), 3),
            [1, 2, 0],
            "at most every node"
        );
        assert_eq!(at(3, Replication::EveryNode, 2), [1, 0]);
        assert_eq!(
            at(5, Replication::Factor(3), 1),
            [0],
            "one node holds every tablet"
        );
        assert!(at(5, Replication::Factor(0), 3).is_empty());
    }

    /// A move changes the one tablet's replicas, in the order given, for every token in it and
    /// no other; moving back to where it was placed undoes it; a bad move changes nothing.
    #[test]
    fn a_moved_tablet_is_on_its_new_replicas_and_no_other_tablet_moves() {
        let option = TabletsOption { initial: 8 };
        let (rf2, nodes) = (Replication::Factor(2), 3);
        let mut tablets = Tablets::new(option);
        let placed = |i| tablet_for(first_token_of(i, 8), 8, rf2, nodes);
        for i in 0..8 {
            assert_eq!(tablets.tablet(first_token_of(i, 8), rf2, nodes), placed(i));
        }
        let inside = first_token_of(3, 8) + 12_345;
        assert_eq!(placed(3).replicas, [0, 1]);
        let moved = tablets.move_tablet(inside, vec![2, 0], rf2, nodes).unwrap();
        assert_eq!(
            moved,
            Tablet {
                replicas: vec![2, 0],
                ..placed(3)
            }
        );
        for token in [moved.first + 1, inside, moved.last] {
            assert_eq!(tablets.tablet(token, rf2, nodes), moved, "token {token}");
        }
        for i in (0..8).filter(|i| *i != 3) {
            let token = first_token_of(i, 8);
            assert_eq!(tablets.tablet(token, rf2, nodes), placed(i), "tablet {i}");
        }
        assert_eq!(
            tablets.tablet(moved.first, rf2, nodes),
            placed(2),
            "the range's first token is the previous tablet's"
        );
        for bad in [vec![2], vec![1, 2, 0], vec![0, 3], vec![1, 1]] {
            assert!(
                tablets
                    .move_tablet(inside, bad.clone(), rf2, nodes)
                    .is_err(),
                "{bad:?}"
            );
            assert_eq!(
                tablets.tablet(inside, rf2, nodes),
                moved,
                "{bad:?} moves nothing"
            );
        }
        let back = tablets.move_tablet(inside, vec![0, 1], rf2, nodes).unwrap();
        assert_eq!(back, placed(3));
        assert_eq!(tablets, Tablets::new(option), "back where it was placed");
    }

    /// The payload decoded as a driver decodes it: tuple elements, the list, its tuples.
    #[test]
    fn the_payload_is_a_cql_tuple_of_the_range_and_the_replicas() {
        let ids = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
        let tablet = Tablet {
            first: -5,
            last: 70,
            replicas: vec![2, 0],
        };
        let bytes = payload(&tablet, &ids);
        let mut r = Reader(&bytes);
        let element = |r: &mut Reader<'_>| r.bytes().unwrap().expect("not null");
        assert_eq!(element(&mut r), (-5i64).to_be_bytes());
        assert_eq!(element(&mut r), 70i64.to_be_bytes());
        let list = element(&mut r);
        assert!(r.0.is_empty(), "three elements");
        let mut l = Reader(&list);
        assert_eq!(l.int().unwrap(), 2);
        for want in [ids[2], ids[0]] {
            let replica = element(&mut l);
            let mut t = Reader(&replica);
            assert_eq!(element(&mut t), want.as_bytes());
            assert_eq!(element(&mut t), 0i32.to_be_bytes(), "shard 0");
            assert!(t.0.is_empty());
        }
        assert!(l.0.is_empty());
    }
}
