//! `vault api` over real HTTP against the CQL stand-in: paging across day partitions, filters,
//! scopes, export, erasure, every kind of bad input, store failures, the OpenAPI document and
//! metrics; and the timeline page in a real headless browser (Debian's `chromium`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use vault::config::{Config, ScyllaConfig};
use vault::event::{self, Event, Source};
use vault::store::scylla::ScyllaStore;
use vault::store::Store;
use vault_sandbox::cql::{CqlNode, Fault, FaultKind};

use crate::common::unique;

const READ: &str = "read-token-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef";
/// 2025-11-24T00:00:00Z.
const DAY0: i64 = 1_763_942_400_000;
const DAY_MS: i64 = 86_400_000;

struct Rig {
    node: CqlNode,
    store: ScyllaStore,
    keyspace: String,
    addr: SocketAddr,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Rig {
    /// A CQL stand-in with the schema, and `vault api` serving it on 127.0.0.1 port 0;
    /// `tokens`: whether the read and admin tokens are configured.
    async fn start(tokens: bool) -> Rig {
        crate::common::init_logging();
        let node = CqlNode::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("CQL stand-in");
        let keyspace = unique("api").replace('-', "_");
        let mut c = Config {
            scylla: ScyllaConfig {
                nodes: vec![node.addr().to_string()],
                keyspace: keyspace.clone(),
                ..ScyllaConfig::default()
            },
            ..Config::default()
        };
        c.api.addr = "127.0.0.1:0".into();
        c.api.max_limit = 500;
        if tokens {
            c.api.read_tokens = vec![READ.into()];
            c.api.admin_tokens = vec![ADMIN.into()];
        }
        let settings = c.validate().expect("valid settings");
        let api_settings = vault::api::ApiSettings::new(&settings.config).expect("api settings");
        let store = ScyllaStore::connect(&settings.config.scylla, true)
            .await
            .expect("migrate");
        let served = ScyllaStore::connect(&settings.config.scylla, false)
            .await
            .expect("connect");
        let api = Arc::new(
            vault::api::Api::new(api_settings, served)
                .await
                .expect("api"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(vault::api::serve(
            listener,
            api,
            stop.clone().cancelled_owned(),
        ));
        Rig {
            node,
            store,
            keyspace,
            addr,
            stop,
            server,
        }
    }

    async fn write(&self, events: &[Event]) {
        for chunk in events.chunks(500) {
            let refs: Vec<&Event> = chunk.iter().collect();
            self.store.write(&refs).await.expect("write events");
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n"));
        request(self.addr, "GET", path, auth.as_deref().unwrap_or("")).await
    }

    async fn get_json(&self, path: &str) -> Value {
        let a = self.get(path, Some(READ)).await;
        assert_eq!(a.status, 200, "GET {path}: {}", a.body);
        serde_json::from_str(&a.body).expect("JSON")
    }
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// One HTTP/1.0 request (the server closes after it): status, head and body.
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Answer {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: t\r\n{headers}\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("answer within 20 s")
        .expect("read");
    let raw = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// An event of `user` at `at_ms`, with a fixed id (so tests can order by it).
fn event(
    user: &str,
    event_type: &str,
    at_ms: i64,
    id: u128,
    attributes: &str,
    offset: i64,
) -> Event {
    let at = chrono::DateTime::from_timestamp_millis(at_ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let json = serde_json::json!({
        "event_id": uuid::Uuid::from_u128(id).to_string(),
        "user_id": user,
        "event_type": event_type,
        "occurred_at": at,
        "attributes": serde_json::from_str::<Value>(attributes).unwrap(),
    })
    .to_string();
    let source = Source {
        topic: Arc::from("activity"),
        partition: 3,
        offset,
        timestamp_ms: Some(at_ms + 1000),
    };
    event::decode(
        Some(b"k"),
        Some(json.as_bytes()),
        source,
        None,
        event::Limits::default(),
    )
    .expect("valid test event")
}

/// `per_day` events a day over `days` days for `user`, every third instant shared by three
/// events (so that pages end inside a group of equal timestamps), newest day first in the table.
fn history(user: &str, days: i64, per_day: i64) -> Vec<Event> {
    let mut out = Vec::new();
    let mut n = 0u128;
    for d in 0..days {
        for i in 0..per_day {
            let at = DAY0 - d * DAY_MS + (i / 3) * 60_000 + 1000;
            let t = ["click", "view", "purchase"][(i % 3) as usize];
            n += 1;
            out.push(event(
                user,
                t,
                at,
                (n * 7919) % 100_000 + 1,
                &format!(r#"{{"n":{n}}}"#),
                n as i64,
            ));
        }
    }
    out
}

/// The events' ids in the API's order: occurred_at newest first, then event_id ascending.
fn expected(events: &[&Event]) -> Vec<String> {
    let mut v: Vec<(i64, uuid::Uuid)> = events
        .iter()
        .map(|e| (e.occurred_at_ms, e.event_id))
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.into_iter().map(|(_, id)| id.to_string()).collect()
}

fn ids(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Follows next_page_token from `path` (which has a `?`) to the end; the ids of every page.
async fn all_pages(rig: &Rig, path: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut url = path.to_owned();
    loop {
        let page = rig.get_json(&url).await;
        pages.push(ids(&page));
        match page["next_page_token"].as_str() {
            Some(t) => url = format!("{path}&page_token={t}"),
            None => return pages,
        }
        assert!(pages.len() < 1000, "paging does not end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_across_days_returns_every_event_once_in_order_without_a_scan() {
    let rig = Rig::start(true).await;
    let mine = history("pager", 12, 10);
    let others = history("someone-else", 3, 10);
    rig.write(&mine).await;
    rig.write(&others).await;
    let want = expected(&mine.iter().collect::<Vec<_>>());
    for limit in [7, 10, 3, 500] {
        let pages = all_pages(&rig, &format!("/v1/users/pager/events?limit={limit}")).await;
        assert!(pages.iter().all(|p| p.len() <= limit));
        assert!(
            pages[..pages.len() - 1].iter().all(|p| p.len() == limit),
            "only the last page is short"
        );
        let got: Vec<String> = pages.concat();
        assert_eq!(
            got, want,
            "limit {limit}: every event once, newest first, across days"
        );
    }
    // The first page of 7 reads the newest day only: one slice of one partition, found through
    // the index, never the table.
    rig.node.clear_requests();
    let first = rig.get_json("/v1/users/pager/events?limit=7").await;
    assert_eq!(ids(&first), want[..7]);
    let reads: Vec<_> = rig
        .node
        .requests()
        .into_iter()
        .filter(|r| r.statement.contains("user_activity"))
        .collect();
    assert!(
        reads
            .iter()
            .all(|r| r.statement.contains("WHERE user_id = ? AND day = ?")),
        "every read of the table names its partition: {reads:?}"
    );
    assert_eq!(
        reads.iter().filter(|r| r.opcode == "EXECUTE").count(),
        1,
        "a page that one day fills reads one partition: {reads:?}"
    );
    // Each event as stored.
    let e = &first["events"][0];
    let newest = mine
        .iter()
        .find(|m| m.event_id.to_string() == want[0])
        .unwrap();
    assert_eq!(e["event_type"], newest.event_type());
    assert_eq!(
        e["attributes"],
        serde_json::from_str::<Value>(newest.attributes().unwrap()).unwrap()
    );
    assert_eq!(e["occurred_at"], "2025-11-24T00:03:01.000Z");
    assert_eq!(e["source"]["topic"], "activity");
    assert_eq!(e["source"]["partition"], 3);
    assert_eq!(e["source"]["offset"], newest.source.offset);
    assert_eq!(first["user_id"], "pager");
    rig.stop().await;
}

/// A page's answer stays about a MiB whatever the events' size: five events of 300 KB come
/// in pages of three and two at the default limit, every one once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_large_events_ends_early_and_the_next_one_goes_on() {
    let rig = Rig::start(true).await;
    let blob = format!(r#"{{"blob":"{}"}}"#, "x".repeat(300_000));
    let big: Vec<Event> = (0..5)
        .map(|i| event("big", "click", DAY0 - i * 60_000, 100 + i as u128, &blob, i))
        .collect();
    rig.write(&big).await;
    let pages = all_pages(&rig, "/v1/users/big/events?limit=100").await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 2]);
    assert_eq!(
        pages.concat(),
        expected(&big.iter().collect::<Vec<_>>()),
        "every event once, in order"
    );
    let one = rig.get_json("/v1/users/big/events?limit=1").await;
    assert_eq!(ids(&one).len(), 1);
    assert!(one["next_page_token"].is_string());
    rig.stop().await;
}

/// A type filter that few rows match ends a page once it has read its most rows, with a next
/// page that resumes after the last row read: each request reads a bounded number of rows, and
/// paging still returns every matching event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_page_reads_a_bounded_number_of_rows_and_paging_goes_on() {
    use vault::store::read::{EventReader, PageRequest};
    let rig = Rig::start(true).await;
    let mine = history("filtered", 4, 9);
    rig.write(&mine).await;
    let reader = EventReader::new(rig.store.session().clone(), &rig.keyspace)
        .await
        .unwrap();
    let types = vec!["purchase".to_owned()];
    let (mut pages, mut got, mut after) = (0, Vec::new(), None);
    loop {
        let page = reader
            .page(&PageRequest {
                user_id: "filtered",
                from_ms: i64::MIN,
                to_ms: i64::MAX,
                event_types: &types,
                limit: 100,
                after,
                max_examined: 5,
                max_bytes: vault::store::read::PAGE_BYTES,
            })
            .await
            .unwrap();
        pages += 1;
        assert!(page.events.len() <= 5);
        got.extend(page.events.iter().map(|e| e.event_id.to_string()));
        match page.next {
            Some(p) => after = Some(p),
            None => break,
        }
        assert!(pages < 100, "paging does not end");
    }
    let purchases: Vec<&Event> = mine
        .iter()
        .filter(|e| e.event_type() == "purchase")
        .collect();
    assert_eq!(got, expected(&purchases), "every purchase once, in order");
    assert!(pages >= 36 / 5, "{pages} pages of at most 5 rows read each");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_and_type_filters_select_exactly_their_events() {
    let rig = Rig::start(true).await;
    let mine = history("filtered", 6, 9);
    rig.write(&mine).await;
    let (since, until) = (DAY0 - 3 * DAY_MS + 2 * 60_000, DAY0 - DAY_MS + 60_000);
    let in_range = |e: &&Event| (since..=until).contains(&e.occurred_at_ms);
    let rfc = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let range = format!("since={}&until={}", rfc(since), rfc(until));
    let want: Vec<&Event> = mine.iter().filter(in_range).collect();
    assert!(!want.is_empty());
    let got = all_pages(&rig, &format!("/v1/users/filtered/events?{range}&limit=4")).await;
    assert_eq!(
        got.concat(),
        expected(&want),
        "since and until, both included"
    );
    let want: Vec<&Event> = mine
        .iter()
        .filter(in_range)
        .filter(|e| matches!(e.event_type(), "click" | "purchase"))
        .collect();
    let got = all_pages(
        &rig,
        &format!("/v1/users/filtered/events?{range}&type=purchase&type=click&limit=2"),
    )
    .await;
    assert_eq!(got.concat(), expected(&want), "types, repeated");
    // Relative times: the whole history is older than a day before now.
    let recent = rig.get_json("/v1/users/filtered/events?since=1d").await;
    assert_eq!(
        ids(&recent),
        Vec::<String>::new(),
        "nothing in the last day"
    );
    let old = all_pages(
        &rig,
        "/v1/users/filtered/events?until=1d&type=view&limit=500",
    )
    .await;
    let views: Vec<&Event> = mine.iter().filter(|e| e.event_type() == "view").collect();
    assert_eq!(old.concat(), expected(&views));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_by_scope() {
    let rig = Rig::start(true).await;
    rig.write(&history("scoped", 1, 3)).await;
    let events = "/v1/users/scoped/events";
    let none = rig.get(events, None).await;
    assert_eq!(none.status, 401, "{}", none.body);
    assert_eq!(none.json()["error"], "unauthorized");
    assert!(none
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer"));
    assert_eq!(
        rig.get(events, Some("not-a-configured-token")).await.status,
        401
    );
    assert_eq!(rig.get(events, Some(READ)).await.status, 200);
    assert_eq!(
        rig.get(events, Some(ADMIN)).await.status,
        200,
        "admin may read"
    );
    assert_eq!(rig.get("/v1/users/scoped/export", None).await.status, 401);
    // Erasure needs the admin scope.
    let del = |tok: &str| {
        let auth = format!("Authorization: Bearer {tok}\r\n");
        async move { request(rig.addr, "DELETE", "/v1/users/scoped?dry_run=true", &auth).await }
    };
    let forbidden = del(READ).await;
    assert_eq!(forbidden.status, 403, "{}", forbidden.body);
    assert!(forbidden.json()["message"]
        .as_str()
        .unwrap()
        .contains("admin scope"));
    assert_eq!(
        request(rig.addr, "DELETE", "/v1/users/scoped", "")
            .await
            .status,
        401
    );
    assert_eq!(del(ADMIN).await.status, 200);
    // The page asks a browser for the token (basic auth, the token as the password).
    let page = rig.get("/ui/users/scoped", None).await;
    assert_eq!(page.status, 401);
    assert!(
        page.header("www-authenticate")
            .unwrap()
            .starts_with("Basic"),
        "{}",
        page.head
    );
    let basic = format!(
        "Authorization: Basic {}\r\n",
        openssl::base64::encode_block(format!("support:{READ}").as_bytes())
    );
    let page = request(rig.addr, "GET", "/ui/users/scoped", &basic).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("Activity of"));
    assert_eq!(
        request(rig.addr, "GET", events, &basic).await.status,
        401,
        "basic auth is for the page only"
    );
    // Operations endpoints need no token.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        assert_eq!(rig.get(path, None).await.status, 200, "{path}");
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_streams_exactly_what_paging_returns() {
    let rig = Rig::start(true).await;
    let mut mine = history("exported", 20, 7);
    // Attributes as a producer may pretty-print them, with an object that would pass for an
    // event of its own on a line of its own.
    let pretty = "{\n  \"page\": \"/home\",\r\n  \"x\":\n{\"event_id\":\"forged\",\"event_type\":\"purchase\"}\n}";
    let json = format!(
        r#"{{"event_id":"{}","user_id":"exported","event_type":"view","occurred_at":"2025-11-20T10:00:00Z","attributes":{pretty}}}"#,
        uuid::Uuid::from_u128(7)
    );
    let source = Source {
        topic: Arc::from("activity"),
        partition: 3,
        offset: 1_000,
        timestamp_ms: Some(DAY0),
    };
    mine.push(
        event::decode(
            Some(b"k"),
            Some(json.as_bytes()),
            source,
            None,
            event::Limits::default(),
        )
        .expect("valid test event"),
    );
    rig.write(&mine).await;
    rig.write(&history("neighbour", 2, 5)).await;
    let a = rig.get("/v1/users/exported/export", Some(READ)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("application/x-ndjson")
    );
    let lines: Vec<Value> = a
        .body
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    let paged = rig.get_json("/v1/users/exported/events?limit=500").await;
    assert_eq!(lines.len(), mine.len());
    let kept = lines
        .iter()
        .find(|l| l["event_id"] == uuid::Uuid::from_u128(7).to_string())
        .expect("the pretty-printed event");
    assert_eq!(
        kept["attributes"],
        serde_json::json!({"page": "/home", "x": {"event_id": "forged", "event_type": "purchase"}})
    );
    assert_eq!(
        Value::Array(lines),
        paged["events"],
        "export equals paging, field for field"
    );
    // `vault query` reads through the same path: its rows are the API's first page.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
        .args(["query", "--user", "exported", "--json", "--limit", "9"])
        .args([
            "--since",
            "2025-11-01T00:00:00Z",
            "--until",
            "2025-12-01T00:00:00Z",
        ])
        .env("VAULT_SCYLLA_NODES", rig.node.addr().to_string())
        .env("VAULT_SCYLLA_KEYSPACE", &rig.keyspace)
        .output()
        .expect("run vault query");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queried: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(queried, ids(&paged)[..9]);
    let unknown = rig.get("/v1/users/nobody/export", Some(READ)).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "unknown_user");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_through_the_api_deletes_reports_and_records() {
    let rig = Rig::start(true).await;
    let mine = history("forgotten", 4, 5);
    rig.write(&mine).await;
    rig.write(&history("kept", 1, 5)).await;
    let auth = format!("Authorization: Bearer {ADMIN}\r\n");
    let dry = request(
        rig.addr,
        "DELETE",
        "/v1/users/forgotten?dry_run=true",
        &auth,
    )
    .await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    assert_eq!(dry.json()["partitions_deleted"], 0);
    assert_eq!(dry.json()["days"].as_array().unwrap().len(), 4);
    assert_eq!(
        rig.get_json("/v1/users/forgotten/events").await["events"]
            .as_array()
            .unwrap()
            .len(),
        20
    );
    let done = request(
        rig.addr,
        "DELETE",
        "/v1/users/forgotten?requested_by=ticket-42",
        &auth,
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.body);
    let report = done.json();
    assert_eq!(report["partitions_deleted"], 4);
    assert_eq!(
        report["days"],
        serde_json::json!(["2025-11-24", "2025-11-23", "2025-11-22", "2025-11-21"])
    );
    assert_eq!(report["dry_run"], false);
    let who = report["requested_by"].as_str().unwrap();
    assert!(
        who.starts_with("api:admin-") && who.ends_with(":ticket-42") && !who.contains(ADMIN),
        "{who}"
    );
    assert!(report["summary"]
        .as_str()
        .unwrap()
        .contains("deleted 4 partition(s)"));
    // Gone from every read, and recorded like every erasure.
    let gone = rig.get("/v1/users/forgotten/events", Some(READ)).await;
    assert_eq!(gone.status, 404, "{}", gone.body);
    assert_eq!(
        rig.get("/v1/users/forgotten/export", Some(READ))
            .await
            .status,
        404
    );
    let recorded: Vec<(String, i32)> = rig
        .store
        .session()
        .query_unpaged(
            format!(
                "SELECT requested_by, partitions FROM {}.erasures WHERE user_id = ?",
                rig.keyspace
            ),
            ("forgotten",),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows::<(String, i32)>()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(recorded, [(who.to_owned(), 4)]);
    assert_eq!(
        rig.get_json("/v1/users/kept/events").await["events"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    let future = request(
        rig.addr,
        "DELETE",
        "/v1/users/kept?through=2999-01-01T00:00:00Z",
        &auth,
    )
    .await;
    assert_eq!(future.status, 400);
    assert_eq!(future.json()["parameter"], "through");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_that_says_what_to_fix() {
    let rig = Rig::start(true).await;
    rig.write(&history("valid", 2, 6)).await;
    let long = "u".repeat(257);
    let first = rig.get_json("/v1/users/valid/events?limit=2").await;
    let token = first["next_page_token"].as_str().unwrap().to_owned();
    let mut tampered = token.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let cases: [(String, u16, &str, &str); 10] = [
        (
            format!("/v1/users/{long}/events"),
            400,
            "user_id",
            "1 to 256 bytes",
        ),
        (
            "/v1/users/%FF/events".into(),
            400,
            "user_id",
            "cannot be read",
        ),
        (
            "/v1/users/nobody/events".into(),
            404,
            "",
            "no event of user 'nobody'",
        ),
        (
            "/v1/users/valid/events?since=last-tuesday".into(),
            400,
            "since",
            "RFC 3339",
        ),
        (
            "/v1/users/valid/events?until=2025-02-30T00:00:00Z".into(),
            400,
            "until",
            "RFC 3339",
        ),
        (
            "/v1/users/valid/events?since=1d&until=3d".into(),
            400,
            "since",
            "after until",
        ),
        (
            format!("/v1/users/valid/events?limit=2&page_token={tampered}"),
            400,
            "page_token",
            "altered",
        ),
        (
            format!("/v1/users/other/events?limit=2&page_token={token}"),
            400,
            "page_token",
            "this user",
        ),
        (
            "/v1/users/valid/events?limit=501".into(),
            400,
            "limit",
            "maximum of 500",
        ),
        (
            "/v1/users/valid/events?kind=click".into(),
            400,
            "query",
            "unknown parameter",
        ),
    ];
    for (path, status, parameter, says) in cases {
        let a = rig.get(&path, Some(READ)).await;
        assert_eq!(a.status, status, "{path}: {}", a.body);
        assert_eq!(
            a.header("content-type").as_deref(),
            Some("application/json"),
            "{path}"
        );
        assert_eq!(
            a.header("x-content-type-options").as_deref(),
            Some("nosniff")
        );
        let body = a.json();
        if !parameter.is_empty() {
            assert_eq!(body["parameter"], parameter, "{path}: {body}");
        }
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(says), "{path}: {message}");
    }
    let same_filters = rig
        .get_json(&format!(
            "/v1/users/valid/events?limit=2&page_token={token}"
        ))
        .await;
    assert_eq!(
        same_filters["events"].as_array().unwrap().len(),
        2,
        "the untouched token works"
    );
    let page = rig.get("/ui/users/valid?since=whenever", Some(READ)).await;
    assert_eq!(page.status, 400);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
            && page.body.contains("RFC 3339")
    );
    let nowhere = rig.get("/v2/anything", Some(READ)).await;
    assert_eq!(
        (nowhere.status, nowhere.json()["error"].clone()),
        (404, "not_found".into())
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failures_are_503_with_a_retry_hint_and_readiness_follows() {
    let rig = Rig::start(true).await;
    rig.write(&history("flaky", 1, 4)).await;
    rig.node
        .inject(Fault::new(FaultKind::Unavailable).matching("FROM"));
    let a = rig.get("/v1/users/flaky/events", Some(READ)).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.header("retry-after").as_deref(), Some("5"));
    let body = a.json();
    assert_eq!(body["error"], "store_unavailable");
    assert_eq!(body["retry_after_seconds"], 5);
    assert!(
        !a.body.contains("stack") && !a.body.contains("SELECT"),
        "{}",
        a.body
    );
    assert_eq!(
        rig.get("/v1/users/flaky/export", Some(READ)).await.status,
        503
    );
    assert_eq!(rig.get("/readyz", None).await.status, 503);
    rig.node.clear_faults();
    assert_eq!(rig.get("/readyz", None).await.status, 200);
    assert_eq!(
        rig.get("/v1/users/flaky/events", Some(READ)).await.status,
        200
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route_and_metrics_count_by_route() {
    let rig = Rig::start(true).await;
    rig.write(&history("documented", 1, 2)).await;
    let doc = rig.get("/v1/openapi.json", None).await.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["components"]["schemas"]["EventsPage"].is_object());
    let ops = vault::api::openapi::operations();
    let listed: BTreeSet<String> = ops.iter().map(|(m, p)| format!("{m} {p}")).collect();
    for route in [
        "get /v1/users/{user_id}/events",
        "get /v1/users/{user_id}/export",
        "delete /v1/users/{user_id}",
        "get /ui/users/{user_id}",
        "get /v1/openapi.json",
        "get /healthz",
        "get /readyz",
        "get /metrics",
    ] {
        assert!(listed.contains(route), "{route} is documented: {listed:?}");
    }
    for (method, path) in &ops {
        let path = path.replace("{user_id}", "documented");
        // A dry run, so that checking the erasure route erases nothing.
        let path = if method == "delete" {
            format!("{path}?dry_run=true")
        } else {
            path
        };
        let auth = format!("Authorization: Bearer {ADMIN}\r\n");
        let a = request(rig.addr, &method.to_uppercase(), &path, &auth).await;
        assert_eq!(
            a.status, 200,
            "{method} {path} is documented and served: {}",
            a.body
        );
    }
    let metrics = rig.get("/metrics", None).await.body;
    assert!(
        metrics.contains(
            r#"vault_api_requests_total{route="/v1/users/{user_id}/events",status="200"}"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "vault_api_request_duration_seconds_bucket{route=\"/v1/users/{user_id}/export\""
    ));
    assert!(
        metrics.contains("vault_api_export_duration_seconds_count{outcome=\"complete\"} 1"),
        "the export, timed to its body's end: {metrics}"
    );
    assert!(!metrics.contains("documented"), "no user id in a label");
    rig.stop().await;
}

#[tokio::test]
async fn without_tokens_the_api_serves_only_loopback() {
    let mut c = Config::default();
    c.api.addr = "0.0.0.0:9899".into();
    let refused = vault::api::ApiSettings::new(&c).unwrap_err().to_string();
    assert!(
        refused.contains("api.addr") && refused.contains("VAULT_API_READ_TOKENS"),
        "{refused}"
    );
    c.api.addr = "127.0.0.1:9899".into();
    assert!(vault::api::ApiSettings::new(&c).is_ok());
    c.api.addr = "0.0.0.0:9899".into();
    c.api.read_tokens = vec![READ.into()];
    assert!(vault::api::ApiSettings::new(&c).is_ok());
    // The binary refuses before it connects to anything.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
        .arg("api")
        .env("VAULT_API_ADDR", "0.0.0.0:0")
        .env_remove("VAULT_API_READ_TOKENS")
        .env_remove("VAULT_API_ADMIN_TOKENS")
        .output()
        .expect("run vault api");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback"), "{err}");
}

/// `chromium --headless --dump-dom URL`: the DOM a person would see once the page loaded.
fn browse(url: &str) -> String {
    let dir = std::env::temp_dir().join(unique("vault-chromium"));
    let out = std::process::Command::new(std::env::var("VAULT_IT_CHROMIUM").unwrap_or_else(|_| "chromium".into()))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            &format!("--user-data-dir={}", dir.display()),
            "--dump-dom",
            url,
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot start chromium ({e}): `make test` installs Debian's chromium package, or set VAULT_IT_CHROMIUM")
        });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 DOM")
}

/// The text of every element `<tag ... class="class">` in a DOM dump, in order.
fn cells(dom: &str, class: &str) -> Vec<String> {
    let open = format!("class=\"{class}\">");
    dom.match_indices(&open)
        .map(|(i, _)| {
            let rest = &dom[i + open.len()..];
            rest[..rest.find("</").unwrap()].to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_a_real_browser_shows_the_events_pages_and_escapes_scripts() {
    // No tokens on loopback: the browser needs no credentials.
    let rig = Rig::start(false).await;
    let mut mine = history("browsed", 3, 4);
    mine.push(event(
        "browsed",
        "<b>bold</b>",
        DAY0 + 50_000_000,
        7,
        r#"{"note":"<script>document.title='pwned'</script>"}"#,
        999,
    ));
    rig.write(&mine).await;
    let want = expected(&mine.iter().collect::<Vec<_>>());
    let base = format!("http://{}", rig.addr);
    let url = format!("{base}/ui/users/browsed?limit=5");
    let dom = tokio::task::spawn_blocking(move || browse(&url))
        .await
        .unwrap();
    // What a person sees: five events, the newest (the hostile one) first, its attribute as text.
    assert_eq!(cells(&dom, "id"), want[..5], "{dom}");
    assert!(
        dom.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;"),
        "shown as text: {dom}"
    );
    assert!(
        !dom.contains("<script"),
        "no script element in the DOM: {dom}"
    );
    assert!(
        dom.contains("&lt;b&gt;bold&lt;/b&gt;") && !dom.contains("<b>"),
        "{dom}"
    );
    assert!(!dom.contains("pwned</title>"), "the script did not run");
    // The next-page link works: following it shows the next five, and so on to the end.
    let mut seen = cells(&dom, "id");
    let mut dom = dom;
    let mut pages = 1;
    while let Some(i) = dom.find("id=\"next-page\" href=\"") {
        let rest = &dom[i + "id=\"next-page\" href=\"".len()..];
        let href = rest[..rest.find('"').unwrap()].replace("&amp;", "&");
        assert!(href.starts_with("/ui/users/browsed?"), "{href}");
        let url = format!("{base}{href}");
        dom = tokio::task::spawn_blocking(move || browse(&url))
            .await
            .unwrap();
        seen.extend(cells(&dom, "id"));
        pages += 1;
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, want, "every event once, in order, through the links");
    assert!(dom.contains("id=\"end\""), "the last page says so");
    rig.stop().await;
}

fn yaml_docs(rel: &str) -> Vec<serde_yaml_ng::Value> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    text.split("\n---\n")
        .map(|d| serde_yaml_ng::from_str(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

fn text(v: &serde_yaml_ng::Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// The configuration a container of the Deployment gets: the ConfigMap's file and its env (each
/// Secret key as a stand-in value), as `vault api` would load it.
#[test]
fn kubernetes_and_compose_run_vault_api_with_tokens_from_a_secret() {
    let docs = yaml_docs("deploy/k8s/vault-api.yaml");
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("a {k} in vault-api.yaml"))
    };
    let (deployment, service) = (kind("Deployment"), kind("Service"));
    let pod = &deployment["spec"]["template"];
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["args"][0], "api");
    let mut env = Vec::new();
    let mut from_secret = BTreeSet::new();
    for e in c["env"].as_sequence().unwrap() {
        let name = text(&e["name"]).to_owned();
        let value = match e["value"].as_str() {
            Some(v) => v.to_owned(),
            None => {
                let r = &e["valueFrom"]["secretKeyRef"];
                from_secret.insert((name.clone(), text(&r["name"]).to_owned()));
                format!("from-secret-{}-0123456789", text(&r["key"]))
            }
        };
        env.push((name, value));
    }
    // The tokens are files of the Secret's volume (tests/it/deploy.rs checks the mounts).
    assert!(!from_secret.iter().any(|(n, _)| n.contains("TOKENS")));
    let files: BTreeSet<&str> = env
        .iter()
        .filter(|(k, _)| k.starts_with("VAULT_API_") && k.ends_with("_TOKENS_FILE"))
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        files,
        BTreeSet::from(["VAULT_API_ADMIN_TOKENS_FILE", "VAULT_API_READ_TOKENS_FILE"])
    );
    // The ConfigMap's file, with that environment, is a configuration vault api starts with.
    let configmap: serde_yaml_ng::Value = yaml_docs("deploy/k8s/configmap.yaml")
        .into_iter()
        .next()
        .unwrap();
    let dir = std::env::temp_dir().join(unique("vault-api-k8s"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vault.toml");
    std::fs::write(&file, text(&configmap["data"]["vault.toml"])).unwrap();
    // A *_FILE setting names a file of a mounted Secret volume (the ScyllaDB password:
    // tests/it/deploy.rs checks the mounts and the files): a stand-in file here.
    let env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k != "VAULT_CONFIG")
        .map(|(k, v)| {
            if !k.ends_with("_FILE") {
                return (k, v);
            }
            let stand_in = dir.join(k.to_ascii_lowercase());
            std::fs::write(&stand_in, "from-secret-0123456789\n").unwrap();
            (k, stand_in.display().to_string())
        })
        .collect();
    let config = vault::config::load_with_env(Some(&file), &[], env.clone()).expect("loads");
    let settings = config.validate().expect("validates");
    let api = vault::api::ApiSettings::new(&settings.config).expect("vault api starts with it");
    assert!(!api.tokens.is_open());
    let port = api.addr.port();
    // check-config masks the tokens.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault"))
        .args(["check-config", file.to_str().unwrap()])
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !shown.contains("from-secret-0123456789") && shown.contains("read_tokens = [\"********\"]"),
        "{shown}"
    );
    // Probes and Service reach the port it serves on.
    let ports = c["ports"].as_sequence().unwrap();
    let named = ports
        .iter()
        .find(|p| p["containerPort"].as_u64() == Some(u64::from(port)))
        .expect("the container port is api.addr's");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], named["name"]);
    assert_eq!(service["spec"]["selector"], pod["metadata"]["labels"]);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], named["name"]);
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        pod["metadata"]["labels"]
    );

    // docker compose: a vault-api service whose environment vault api starts with.
    let compose: serde_yaml_ng::Value = yaml_docs("docker-compose.yml").into_iter().next().unwrap();
    let svc = &compose["services"]["vault-api"];
    assert_eq!(svc["command"][0], "api");
    let env: Vec<(String, String)> = svc["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(k, _)| text(k) != "<<")
        .map(|(k, v)| (text(k).to_owned(), text(v).to_owned()))
        .collect();
    let settings = vault::config::load_with_env(None, &[], env)
        .unwrap()
        .validate()
        .unwrap();
    let api = vault::api::ApiSettings::new(&settings.config).expect("compose's vault api starts");
    assert!(!api.tokens.is_open());
    assert_eq!(
        svc["ports"][0],
        format!("127.0.0.1:{0}:{0}", api.addr.port()).as_str(),
        "published on loopback only"
    );
}
